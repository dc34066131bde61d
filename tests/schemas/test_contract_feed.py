"""What a real clinical feed sends (issue 15), on the contract side: versions spelled as feeds
spell them, fields the contract does not name carried as extensions, censored results, any
well-formed drug code, doses in mg, mg/m2 or mg/kg with the body size, course facts,
labelled segmentations, a study without a series. Known fields stay strict."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    EVENT_KINDS,
    TERMS,
    example,
    load_schema,
    make_event,
    normalize_event,
    validate,
    validate_forecast,
)
from schemas.events import extensions
from schemas.loader import known_fields
from schemas.terms import DRUG_SYSTEMS, NAMESPACES
from schemas.units import drug_dose


def _paths(event: dict[str, Any]) -> list[str]:
    return [issue.path for issue in validate(event)]


def _chemo(**body: Any) -> dict[str, Any]:
    event = example("treatment.chemotherapy")
    event["body"] = {"type": "chemotherapy", "drug": {"name": "temozolomide"}, "dose": {"value": 150, "unit": "mg/m2"}, **body}
    return event


# -- versions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "1.0", "1.0.0", "1.1", "1.1.0", "1.7", "1.10.2"])
def test_every_spelling_of_a_major_1_version_is_accepted(version: str) -> None:
    event = example("lab")
    event["schema_version"] = version
    assert validate(event) == []
    assert normalize_event(event)["schema_version"] == version  # recorded as sent


@pytest.mark.parametrize("version", ["2", "2.0", "0.9", "1.", "1.0.0.0", "01", "1.01", " 1", "1.0-beta", ""])
def test_other_versions_are_refused_with_the_rule(version: str) -> None:
    event = example("lab")
    event["schema_version"] = version
    issues = validate(event)
    assert [i.path for i in issues] == ["schema_version"]
    assert "major version 1" in issues[0].message and ".v2" in issues[0].message


def test_make_event_writes_the_current_minor_version() -> None:
    from datetime import datetime, timezone

    event = make_event("lab", "VP-0042", datetime(2024, 3, 4, tzinfo=timezone.utc),
                       {"code": "2857-1", "value": 1.0, "unit": "ng/mL"}, source="lis")
    assert event["schema_version"] == "1.1" and validate(event) == []


# -- extensions -------------------------------------------------------------------------------

NAME = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=("Cs",)), max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(EVENT_KINDS), name=NAME, value=JSON, where=st.sampled_from(["top", "body"]))
def test_an_unknown_field_anywhere_is_carried_never_refused(kind: str, name: str, value: Any, where: str) -> None:
    event = example(kind)
    node = event if where == "top" else event["body"]
    if name in node:
        return  # a known field of this level is not an extension
    node[name] = value
    assert validate(event) == []
    found = normalize_event(event)["extensions"]
    assert list(found.values()) == [value] and len(found) == 1
    (path,) = found
    assert path.startswith("body") == (where == "body")


def test_extensions_inside_known_objects_are_found_with_their_path() -> None:
    event = example("imaging.labelled")
    event["body"]["segmentation_uri"]["label_set"] = "BraTS-2021"
    event["body"]["measures"]["necrosis_volume"] = {"value": 1.2, "unit": "mL"}
    assert validate(event) == []
    assert extensions(event) == {
        "body.series_description": "AX FLAIR",
        "body.segmentation_uri.label_set": "BraTS-2021",
        "body.measures.necrosis_volume": {"value": 1.2, "unit": "mL"},
    }
    # A free-form map the contract names is not looked into: its keys are labels, not fields.
    assert not any(p.startswith("body.segmentation_labels") for p in extensions(event))


def test_known_fields_stay_strict_next_to_extensions() -> None:
    event = example("lab.extensions")
    event["body"]["value"] = "312"
    assert _paths(event) == ["body.value"]
    event = example("lab.extensions")
    event["body"]["unit"] = "furlongs"
    assert _paths(event) == ["body.unit"]


def test_every_field_a_schema_names_is_known() -> None:
    # Each body property of each kind's schema is in the tree extensions are judged against.
    for kind in EVENT_KINDS:
        body = load_schema(kind)["$defs"]["body"]
        assert set(body["properties"]) <= set(known_fields(kind)["body"]), kind
    assert {"comparator", "below_lod", "lod"} <= set(known_fields("ctdna")["body"])
    assert set(known_fields("treatment")["body"]["drug"]) == {"name", "rxnorm", "code", "system", "display"}


@pytest.mark.parametrize(
    ("body", "misplaced"),
    [
        ({"type": "radiotherapy", "dose": {"value": 2, "unit": "Gy"}, "drug": {"name": "x"}}, "body.drug"),
        ({"type": "radiotherapy", "dose": {"value": 2, "unit": "Gy"}, "cycle": 1}, "body.cycle"),
        ({"type": "chemotherapy", "drug": {"name": "x"}, "dose": {"value": 1, "unit": "mg"}, "fraction_number": 1}, "body.fraction_number"),
        ({"type": "surgery", "resection_mask_uri": example("treatment.surgery")["body"]["resection_mask_uri"],
          "dose": {"value": 1, "unit": "mg"}}, "body.dose"),
    ],
)
def test_a_known_field_of_another_treatment_type_is_refused_not_carried(body: dict, misplaced: str) -> None:
    event = example("treatment")
    event["body"] = body
    issues = validate(event)
    assert [i.path for i in issues] == [misplaced] and "belong" in issues[0].message


# -- censored results -------------------------------------------------------------------------


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_a_comparator_makes_the_value_a_limit(comparator: str) -> None:
    event = example("lab.censored")
    event["body"]["comparator"] = comparator
    body = normalize_event(event)["body"]
    assert (body["comparator"], body["canonical_value"]) == (comparator, 0.1)


def test_below_lod_is_a_result_below_its_limit_in_canonical_units() -> None:
    event = example("ctdna.below-lod")
    body = normalize_event(event)["body"]
    assert (body["comparator"], body["value"], body["canonical_value"], body["canonical_lod"]) == ("<", 0.001, 0.001, 0.001)
    event["body"].update(unit="%", lod=0.1, value=0.04)  # a reading under the limit, in %
    body = normalize_event(event)["body"]
    assert body["canonical_value"] == pytest.approx(0.001) and body["canonical_reading"] == pytest.approx(0.0004)


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (lambda b: b.pop("lod"), "body.lod", "required field is missing"),
        (lambda b: b.update(comparator="<"), "body.comparator", "cannot be given with below_lod"),
        (lambda b: b.update(value=0.01), "body.value", "above the lod"),
        (lambda b: b.update(lod=0), "body.lod", "less than or equal to the minimum of 0"),
        (lambda b: b.update(lod=150, unit="%"), "body.lod", "a fraction must lie within [0, 1]"),
        (lambda b: b.update(below_lod=False), "body.value", "required field is missing"),
    ],
)
def test_a_censored_result_says_one_thing(change, path: str, words: str) -> None:
    event = example("ctdna.below-lod")
    change(event["body"])
    issues = validate(event)
    assert [i.path for i in issues] == [path], issues
    assert words in issues[0].message


def test_nothing_lies_below_zero() -> None:
    event = example("lab.censored")
    event["body"]["value"] = 0
    assert _paths(event) == ["body.value"]


# -- drugs and doses --------------------------------------------------------------------------

ISSUE_DRUGS = [
    "temozolomide", "lomustine", "carmustine", "bevacizumab", "irinotecan", "carboplatin", "cisplatin", "docetaxel",
    "paclitaxel", "gemcitabine", "fluorouracil", "oxaliplatin", "enzalutamide", "abiraterone", "leuprolide",
    "osimertinib", "pembrolizumab", "nivolumab",
]


def test_the_issues_drugs_are_ingredients_of_the_term_table() -> None:
    for name in ISSUE_DRUGS:
        term = TERMS.drug_by_name(name)
        assert term is not None and term.system == "rxnorm", name
        assert term.iri == NAMESPACES["rxnorm"] + term.code and DRUG_SYSTEMS["rxnorm"][1].match(term.code)
    assert TERMS.drug("rxnorm", "37776").display == "temozolomide"
    cisplatin = TERMS.drug("rxnorm", "2555")
    assert [t.iri for t in TERMS.drug_equivalents(cisplatin)] == [NAMESPACES["ncit"] + "C376"]
    assert TERMS.drug_equivalents(TERMS.drug("ncit", "C376")) == (cisplatin,)


@pytest.mark.parametrize(
    ("drug", "expected_codes", "known"),
    [
        ({"name": "Lomustine"}, [NAMESPACES["rxnorm"] + "6466"], True),  # a name the table knows is coded
        ({"rxnorm": "2555"}, [NAMESPACES["rxnorm"] + "2555", NAMESPACES["ncit"] + "C376"], True),
        ({"code": "C376", "system": "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"},
         [NAMESPACES["ncit"] + "C376", NAMESPACES["rxnorm"] + "2555"], True),
        ({"name": "investigational agent", "code": "99999901", "system": "rxnorm"}, [NAMESPACES["rxnorm"] + "99999901"], False),
        ({"name": "an ATC-coded agent", "code": "L01XX", "system": "atc"}, [NAMESPACES["atc"] + "L01XX"], False),
        ({"name": "a drug without a code"}, [], False),
    ],
)
def test_any_well_formed_drug_is_accepted_and_coded_as_far_as_known(drug: dict, expected_codes: list[str], known: bool) -> None:
    event = _chemo(drug=drug)
    assert validate(event) == []
    normalized = normalize_event(event)["body"]["drug"]
    assert normalized["codes"] == expected_codes
    assert normalized["name"]  # as sent, or the table's
    assert (normalized["term_iri"] is not None) == known


@pytest.mark.parametrize(
    ("drug", "path", "words"),
    [
        ({"code": "C376", "system": "rxnorm"}, "body.drug.code", "RxCUI"),
        ({"code": "2555", "system": "ncit"}, "body.drug.code", "C and 1 to 7 digits"),
        ({"code": "2555"}, "body.drug", "system"),
        ({"code": "2555", "system": "rxnorm", "rxnorm": "37776"}, "body.drug.rxnorm", "differs"),
        ({"code": "2555", "system": "http://example.org/drugs"}, "body.drug.system", "is not one of"),
        ({}, "body.drug", "needs at least one of 'name', 'code', 'rxnorm'"),
    ],
)
def test_a_drug_code_out_of_its_systems_format_is_refused(drug: dict, path: str, words: str) -> None:
    issues = validate(_chemo(drug=drug))
    assert [i.path for i in issues] == [path], issues
    assert words in issues[0].message


WEIGHT = st.floats(min_value=1, max_value=300)
AREA = st.floats(min_value=0.2, max_value=4)
DOSE = st.floats(min_value=0.01, max_value=5000)


@settings(max_examples=200, deadline=None)
@given(dose=DOSE, unit=st.sampled_from(["mg", "mg/m2", "mg/kg"]), weight=st.none() | WEIGHT, area=st.none() | AREA)
def test_a_drug_dose_converts_exactly_when_and_only_when_the_body_size_allows(dose, unit, weight, area) -> None:
    per_m2, mg = drug_dose(dose, unit, weight, area)
    exact = {"mg": Fraction(dose), "mg/m2": Fraction(dose) * Fraction(area) if area else None,
             "mg/kg": Fraction(dose) * Fraction(weight) if weight else None}[unit]
    assert mg == (float(exact) if exact is not None else None)
    if unit == "mg/m2":
        assert per_m2 == dose
    elif exact is not None and area is not None:
        assert per_m2 == float(exact / Fraction(area))  # one rounding
    else:
        assert per_m2 is None  # never a body size assumed


def test_normalized_doses_are_in_mg_per_m2_only_where_computable() -> None:
    body = normalize_event(example("treatment.chemotherapy-mg-kg"))["body"]
    assert body["dose"]["canonical_unit"] == "mg/m2"
    assert body["dose"]["canonical_value"] == pytest.approx(10 * 78.5 / 1.95)
    assert body["dose"]["mg"] == pytest.approx(785.0)
    without_size = example("treatment.chemotherapy-mg-kg")
    del without_size["body"]["body_surface_area_m2"]
    body = normalize_event(without_size)["body"]
    assert (body["dose"]["canonical_value"], body["dose"]["canonical_unit"], body["dose"]["mg"]) == (10.0, "mg/kg", 785.0)
    flat = normalize_event(example("treatment.chemotherapy-flat-dose"))["body"]["dose"]
    assert (flat["canonical_value"], flat["canonical_unit"], flat["mg"]) == (200.0, "mg", 200.0)


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        (lambda b: b.update(body_weight_kg=0), "body.body_weight_kg", "minimum of 0"),
        (lambda b: b.update(body_surface_area_m2=11), "body.body_surface_area_m2", "maximum of 10"),
        (lambda b: b.update(cycle=7), "body.cycle", "beyond the 6 planned"),
        (lambda b: b.update(day_of_cycle=29), "body.day_of_cycle", "beyond a cycle of 28 days"),
        (lambda b: b.update(line_of_therapy=0), "body.line_of_therapy", "minimum of 1"),
        (lambda b: b.update(cycle_length_days=0), "body.cycle_length_days", "minimum of 0"),
        (lambda b: b.update(regimen=""), "body.regimen", "should be non-empty"),
        (lambda b: b["dose"].update(unit="g"), "body.dose.unit", "is not one of"),
    ],
)
def test_course_facts_and_body_size_are_checked(change, path: str, words: str) -> None:
    event = example("treatment.chemotherapy")
    change(event["body"])
    issues = validate(event)
    assert [i.path for i in issues] == [path], issues
    assert words in issues[0].message


# -- imaging ----------------------------------------------------------------------------------


def test_a_study_needs_no_series_and_labels_need_a_segmentation() -> None:
    assert validate(example("imaging.study-only")) == []
    event = example("imaging.labelled")
    del event["body"]["segmentation_uri"]
    event["body"]["dicom_uri"] = example("imaging")["body"]["dicom_uri"]
    assert "body" in _paths(event)  # segmentation_uri is a dependency of segmentation_labels


@pytest.mark.parametrize(
    ("labels", "path"),
    [({"1": "tumour"}, "body.segmentation_labels['1']"), ({"-1": "edema"}, "body.segmentation_labels['-1']"),
     ({"01": "edema"}, "body.segmentation_labels['01']"), ({}, "body.segmentation_labels")],
)
def test_segmentation_labels_are_integers_with_known_meanings(labels: dict, path: str) -> None:
    event = example("imaging.labelled")
    event["body"]["segmentation_labels"] = labels
    assert _paths(event) == [path]


def test_normalized_labels_are_integers() -> None:
    body = normalize_event(example("imaging.labelled"))["body"]
    assert body["segmentation_labels"] == {1: "necrosis", 2: "edema", 4: "enhancing"}


# -- forecasts ------------------------------------------------------------------------------


def test_a_forecast_may_say_when_its_data_were_recorded() -> None:
    forecast = example("forecast")
    assert validate_forecast(forecast) == []
    forecast["data_time"] = "2024-02-12"
    assert [i.path for i in validate_forecast(forecast)] == ["data_time"]
    del forecast["data_time"]
    assert validate_forecast(forecast) == []


def test_the_label_meanings_are_one_list_in_code_schema_and_shapes() -> None:
    from schemas.terms import BRATS_LABELS, SEGMENTATION_MEANINGS, TUMOUR_MEANINGS
    from stream.shapes import shapes_text  # noqa: PLC0415  (the SHACL shapes hold the list too)

    labels = load_schema("imaging")["$defs"]["body"]["properties"]["segmentation_labels"]
    assert labels["additionalProperties"]["enum"] == list(SEGMENTATION_MEANINGS)
    assert TUMOUR_MEANINGS < set(SEGMENTATION_MEANINGS) and set(BRATS_LABELS.values()) <= TUMOUR_MEANINGS
    assert 'sh:in ( "' + '" "'.join(SEGMENTATION_MEANINGS) + '" )' in shapes_text()
