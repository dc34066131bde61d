"""validate(): each way of breaking the contract is reported once, at the field at fault."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from schemas import (
    ContractError,
    EventValidationError,
    ValidationIssue,
    example,
    is_valid,
    validate,
    validate_forecast,
    validate_or_raise,
)

Event = dict[str, Any]


def _with(kind: str, change: Callable[[Event], object]) -> Event:
    event = example(kind)
    change(event)
    return event


def _set(path: str, value: object) -> Callable[[Event], None]:
    def change(event: Event) -> None:
        *parents, last = path.split(".")
        node = event
        for key in parents:
            node = node[key]
        node[last] = value

    return change


def _delete(path: str) -> Callable[[Event], None]:
    def change(event: Event) -> None:
        *parents, last = path.split(".")
        node = event
        for key in parents:
            node = node[key]
        del node[last]

    return change


def _many(*changes: Callable[[Event], None]) -> Callable[[Event], None]:
    def change(event: Event) -> None:
        for each in changes:
            each(event)

    return change


CLAIM = {"uri": "patients/VP-0004/mask.nii.gz", "sha256": "ab" * 32, "size": 10, "format": "nifti"}

# (kind, change, the one path reported, words the message must contain)
NEGATIVES = [
    ("lab", _delete("body.unit"), "body.unit", "required field is missing"),
    ("lab", _delete("occurred_at"), "occurred_at", "required field is missing"),
    ("lab", _set("occurred_at", "2024-02-12T08:40:00"), "occurred_at", "zone offset"),
    ("lab", _set("recorded_at", "2024-02-30T08:40:00Z"), "recorded_at", "day is out of range"),
    ("lab", _set("recorded_at", "12/02/2024 08:40"), "recorded_at", "zone offset"),
    ("lab", _set("event_id", "not-a-uuid"), "event_id", "UUID"),
    ("lab", _set("event_id", "3F2504E0-4F89-41D3-9A0C-0305E82C3301"), "event_id", "lower-case"),
    ("lab", _set("patient_id", "VP-0002\n"), "patient_id", "pseudonym"),
    ("lab", _set("patient_id", "V1"), "patient_id", "pseudonym"),
    ("lab", _set("source", "   "), "source", "feed name"),
    ("lab", _set("schema_version", "2.0"), "schema_version", "not a version of the contract's major version 1"),
    ("lab", _set("schema_version", "1.01"), "schema_version", "not a version of the contract's major version 1"),
    ("lab", _set("schema_version", "v1"), "schema_version", "not a version of the contract's major version 1"),
    ("lab", _set("schema_version", 1), "schema_version", "not of type 'string'"),
    ("lab", _set("kind", "xray"), "kind", "'xray' is not one of"),
    ("lab", _set("body.code", "99999-9"), "body.code", "'99999-9' is not a known LOINC code"),
    ("lab", _set("body.code", "PSA"), "body.code", "LOINC code"),
    (
        "lab",
        _set("body.unit", "furlongs"),
        "body.unit",
        "'furlongs' is not a known unit (expected one convertible to ng/mL)",
    ),
    ("lab", _set("body.unit", "U/L"), "body.unit", "cannot be converted to 'ng/mL'"),
    ("lab", _set("body.value", math.nan), "body.value", "finite"),
    ("lab", _set("body.value", math.inf), "body.value", "finite"),
    ("lab", _set("body.value", -0.5), "body.value", "minimum of 0"),
    ("lab", _set("body.value", "6.8"), "body.value", "not of type 'number'"),
    ("lab", _many(_set("body.value", 1e308), _set("body.unit", "mg/L")), "body.value", "maximum"),
    ("lab", _set("body.value", 2**64), "body.value", "greater than the maximum of 1000000000000"),
    ("lab", _set("body.value", 10**12 + 1), "body.value", "maximum of 1000000000000"),
    ("lab", _set("occurred_at", "0001-01-01T00:00:00Z"), "occurred_at", "Kafka record timestamps"),
    ("lab", _set("occurred_at", "1970-01-01T01:00:00+01:00"), "occurred_at", "before 1970-01-01T00:00:00.001Z"),
    ("lab", _set("recorded_at", "1969-12-31T23:59:59Z"), "recorded_at", "not a plausible time"),
    ("ctdna", _set("body.value", 1e13), "body.value", "maximum of 1000000000000"),
    ("ctdna", _set("body.value", 150), "body.value", "1.5 as a fraction"),
    (
        "ctdna",
        _many(_set("body.value", 1.2), _set("body.unit", "1")),
        "body.value",
        "within [0, 1]",
    ),
    ("ctdna", _set("body.unit", "ng/mL"), "body.unit", "cannot be converted to '1'"),
    ("ctdna", _set("body.measure", "mutations"), "body.measure", "is not one of"),
    (
        "imaging",
        _many(_delete("body.dicom_uri"), _delete("body.segmentation_uri")),
        "body",
        "needs at least one of 'dicom_uri', 'segmentation_uri'",
    ),
    (
        "imaging",
        _set("body.modality", "XR"),
        "body.modality",
        "'XR' is not one of ['MR', 'CT', 'PT']",
    ),
    ("imaging", _set("body.study_uid", "1.2.abc"), "body.study_uid", "DICOM UID"),
    ("imaging", _set("body.study_uid", "1." * 40 + "1"), "body.study_uid", "too long"),
    (
        "imaging",
        _set("body.segmentation_uri.uri", "../../etc/passwd"),
        "body.segmentation_uri.uri",
        "'..'",
    ),
    (
        "imaging",
        _set("body.segmentation_uri.uri", "/etc/passwd"),
        "body.segmentation_uri.uri",
        "relative path",
    ),
    (
        "imaging",
        _set("body.segmentation_uri.uri", "s3://bucket/key"),
        "body.segmentation_uri.uri",
        "DICOMweb",
    ),
    ("imaging", _set("body.dicom_uri.sha256", "abc123"), "body.dicom_uri.sha256", "SHA-256"),
    ("imaging", _set("body.dicom_uri.size", -1), "body.dicom_uri.size", "minimum of 0"),
    ("imaging", _set("body.dicom_uri.size", 2**64), "body.dicom_uri.size", "maximum of 1099511627776"),
    (
        "imaging",
        _set("body.voxel_spacing_mm", [1.0, 1e4, 1.0]),
        "body.voxel_spacing_mm[1]",
        "maximum of 1000",
    ),
    (
        "imaging",
        _set("body.voxel_spacing_mm", [1.0, 1.0, 1e-4]),
        "body.voxel_spacing_mm[2]",
        "minimum of 0.001",
    ),
    (
        "imaging",
        _set("body.measures.tumor_volume.value", 2e9),
        "body.measures.tumor_volume.value",
        "maximum of 1000000000",
    ),
    (
        "imaging",
        _set("body.voxel_spacing_mm", [1.0, 0.0, 1.0]),
        "body.voxel_spacing_mm[1]",
        "minimum of 0",
    ),
    ("imaging", _set("body.voxel_spacing_mm", [1.0, 1.0]), "body.voxel_spacing_mm", "too short"),
    (
        "imaging",
        _set("body.measures.tumor_volume.unit", "mm"),
        "body.measures.tumor_volume.unit",
        "cannot be converted to 'mL'",
    ),
    (
        "treatment",
        _set("body.dose.unit", "mg"),
        "body.dose.unit",
        "'mg' is not one of ['Gy', 'cGy']",
    ),
    ("treatment", _set("body.dose.value", 0), "body.dose.value", "minimum of 0"),
    ("treatment", _set("body.dose.value", 1e7), "body.dose.value", "maximum of 1000000"),
    ("treatment", _set("body.fractions_planned", 1e12), "body.fractions_planned", "maximum of 1000"),
    ("treatment", _set("body.fractions_planned", 2**64), "body.fractions_planned", "maximum of 1000"),
    ("treatment", _set("body.fractions_planned", 30.5), "body.fractions_planned", "not of type 'integer'"),
    ("treatment", _set("body.fraction_number", 1001), "body.fraction_number", "maximum of 1000"),
    (
        "treatment",
        _set("body.fraction_number", 31),
        "body.fraction_number",
        "beyond the 30 planned",
    ),
    (
        "treatment",
        _set("body.drug", {"name": "temozolomide"}),
        "body.drug",
        "not a field of a radiotherapy",
    ),
    ("treatment", _set("body.type", "hormone"), "body.type", "is not one of"),
    (
        "treatment",
        _set("body", {"type": "surgery", "extent": "subtotal"}),
        "body.resection_mask_uri",
        "required field is missing",
    ),
    ("treatment", _set("body.planned", "yes"), "body.planned", "not of type 'boolean'"),
]


@pytest.mark.parametrize(
    ("kind", "change", "path", "words"),
    NEGATIVES,
    ids=[f"{kind}:{path}:{words[:24]}" for kind, _, path, words in NEGATIVES],
)
def test_each_defect_is_reported_once_at_its_path(
    kind: str, change: Callable[[Event], None], path: str, words: str
) -> None:
    issues = validate(_with(kind, change))
    assert [issue.path for issue in issues] == [path], issues
    assert issues[0].message.startswith(f"{path}: ")
    assert words in issues[0].message


VALID_VARIANTS = [
    ("lab", _many(_set("body.code", "10334-1"), _set("body.unit", "U/mL"), _set("body.value", 35))),
    ("lab", _many(_set("body.code", "2532-0"), _set("body.unit", "IU/L"), _set("body.value", 240))),
    ("lab", _set("body.unit", "\u00b5g/L")),
    ("lab", _set("recorded_at", "2024-02-11T23:00:00-05:00")),  # backfill: recorded before occurred
    ("lab", _set("occurred_at", "1970-01-01T00:00:00.001Z")),  # the first positive Kafka timestamp
    ("lab", _set("body.value", 10**12)),  # every bound is inclusive
    ("imaging", _set("body.voxel_spacing_mm", [0.001, 1000, 2.5])),
    (
        "ctdna",
        _many(
            _set("body.measure", "tumor_fraction"), _set("body.value", 0.04), _set("body.unit", "1")
        ),
    ),
    (
        "ctdna",
        _many(
            _set("body.measure", "cfdna_concentration"),
            _set("body.value", 18.2),
            _set("body.unit", "ng/mL"),
        ),
    ),
    (
        "ctdna",
        _many(
            _set("body.measure", "copies_per_ml"),
            _set("body.value", 1200),
            _set("body.unit", "{copies}/mL"),
        ),
    ),
    ("imaging", _delete("body.dicom_uri")),
    ("imaging", _many(_delete("body.segmentation_uri"), _delete("body.measures"))),
    ("imaging", _set("body.segmentation_uri.uri", "file:///data/VP-0001/seg.nii.gz")),
    ("imaging", _set("body.measures.tumor_volume", {"value": 12400, "unit": "mm3"})),
    ("treatment", _set("body.dose", {"value": 180, "unit": "cGy"})),
    ("treatment", _set("body.planned", True)),
    ("treatment", _many(_set("body.fraction_number", 1000.0), _set("body.fractions_planned", 1000))),
    (
        "treatment",
        _set(
            "body",
            {
                "type": "chemotherapy",
                "drug": {"name": "temozolomide", "rxnorm": "37776"},
                "dose": {"value": 75, "unit": "mg/m2"},
                "route": "oral",
            },
        ),
    ),
    (
        "treatment",
        _set("body", {"type": "surgery", "resection_mask_uri": CLAIM, "extent": "gross_total"}),
    ),
]


@pytest.mark.parametrize(("kind", "change"), VALID_VARIANTS)
def test_valid_variants_pass(kind: str, change: Callable[[Event], None]) -> None:
    assert validate(_with(kind, change)) == []


def test_a_body_of_another_kind_is_refused() -> None:
    # A lab body under kind ctdna: its code is an extension of a ctDNA body, but the ctDNA
    # fields it lacks are required.
    event = example("lab")
    event["kind"] = "ctdna"
    paths = {issue.path for issue in validate(event)}
    assert "body.measure" in paths


@pytest.mark.parametrize("junk", [None, [], "event", 3, b"{}", {"kind": None}])
def test_anything_that_is_not_an_event_gets_issues(junk: object) -> None:
    issues = validate(junk)
    assert issues and all(isinstance(issue, ValidationIssue) for issue in issues)


@pytest.mark.parametrize("value", [math.inf, -math.inf, 10**400])
def test_a_number_beyond_the_float_range_is_called_that_not_out_of_bounds(value: float) -> None:
    # inf also exceeds body.value's maximum; "must be finite" is what a person can act on.
    issues = validate(_with("lab", _set("body.value", value)))
    assert [issue.path for issue in issues] == ["body.value"], issues
    assert "finite" in issues[0].message or "beyond the float range" in issues[0].message


def test_unprintably_large_integers_are_reported_not_raised() -> None:
    event = example("lab")
    event["body"]["value"] = 10**5000
    event["source"] = 10**5000
    paths = {issue.path for issue in validate(event)}
    assert {"body.value", "source"} <= paths or "(root)" in paths


def test_validate_or_raise_returns_the_event_or_carries_every_issue() -> None:
    event = example("lab")
    assert validate_or_raise(event) is event and is_valid(event)
    del event["source"]
    event["body"]["unit"] = "furlongs"
    with pytest.raises(EventValidationError) as caught:
        validate_or_raise(event)
    assert isinstance(caught.value, ContractError)
    assert [issue.path for issue in caught.value.issues] == ["source", "body.unit"]
    assert "furlongs" in str(caught.value) and not is_valid(event)


# -- forecasts ----------------------------------------------------------------------------


def _forecast(change: Callable[[Event], object]) -> Event:
    forecast = example("forecast")
    change(forecast)
    return forecast


def _quantity(horizon: int, name: str, **fields: object) -> Callable[[Event], None]:
    def change(forecast: Event) -> None:
        forecast["horizons"][horizon]["quantities"].setdefault(name, {}).update(fields)

    return change


FORECAST_NEGATIVES = [
    (
        _quantity(0, "marker:2857-1", lo=100.0),
        "horizons[0].quantities['marker:2857-1']",
        "lo <= median <= hi",
    ),
    (
        _quantity(1, "marker:1-1", median=1.0, lo=0.5, hi=2.0, unit="ng/mL"),
        "horizons[1].quantities['marker:1-1']",
        "not a known LOINC code",
    ),
    (
        _quantity(1, "tumor_volume_ml", median=1.0, lo=0.5, hi=2.0, unit="mm"),
        "horizons[1].quantities.tumor_volume_ml.unit",
        "cannot be converted to 'mL'",
    ),
    (
        _quantity(1, "tumour_size", median=1.0, lo=0.5, hi=2.0, unit="1"),
        "horizons[1].quantities.tumour_size",
        "not a quantity name",
    ),
    (_quantity(0, "burden", median=math.nan), "horizons[0].quantities.burden.median", "finite"),
    (_delete("horizons"), "horizons", "required field is missing"),
    (_set("members", 0), "members", "minimum of 1"),
    (_set("members", 2**64), "members", "maximum of 1000000"),
    (lambda f: f["horizons"][0].update(days=36526), "horizons[0].days", "maximum of 36525"),
    (_set("issued_at", "0001-01-01T00:00:00Z"), "issued_at", "Kafka record timestamps"),
    (_set("analysis_time", "2024-02-12"), "analysis_time", "zone offset"),
    (_set("based_on_events", ["x"]), "based_on_events[0]", "UUID"),
]


@pytest.mark.parametrize(("change", "path", "words"), FORECAST_NEGATIVES)
def test_forecast_defects_are_reported_at_their_path(
    change: Callable[[Event], None], path: str, words: str
) -> None:
    issues = validate_forecast(_forecast(change))
    assert [issue.path for issue in issues] == [path], issues
    assert words in issues[0].message


def test_forecast_scenario_defaults_and_may_be_omitted() -> None:
    from schemas import load_schema

    assert load_schema("forecast")["properties"]["scenario"]["default"] == "planned"
    assert validate_forecast(_forecast(_delete("scenario"))) == []
