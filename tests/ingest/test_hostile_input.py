"""Records the normalizer must refuse with a reason (issue 14), as a pure function (no broker).

One named regression test per case the issue reports, then properties: any record (bytes, key,
headers, topic) comes out as exactly one observation, dead letter or duplicate, never as an
internal failure, and never stops the valid events of its batch.
"""

from __future__ import annotations

import codecs
import copy
import json
import logging
import math
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from schemas import EVENT_KINDS
from schemas import example as example_of
from schemas.times import EARLIEST_TIME
from stream import imaging
from stream.deadletter import DeadLetter
from stream.decode import decode_jsonld
from stream.normalizer import Normalizer, NormalizerSettings, Observation, SourceRecord
from stream.topics import Topics
from stream.volumes import claim_check

TOPICS = Topics("hostile")
NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)  # after every example's date
DICOMWEB = "https://pacs.example.org/dicomweb"  # the imaging example's dicom_uri is under it
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def normalizer(tmp_path_factory: pytest.TempPathFactory) -> Normalizer:
    root = tmp_path_factory.mktemp("imaging-root")
    (root / "patients").mkdir()
    settings = NormalizerSettings(imaging_root=root, dicomweb_base=DICOMWEB)
    return Normalizer(settings, TOPICS, clock=lambda: NOW)


@pytest.fixture(scope="module")
def templates(normalizer: Normalizer) -> dict[str, dict[str, Any]]:
    """A valid event per kind; the scan's segmentation and density map are real files under
    the imaging root, so that mutated scans reach the claim-check and NIfTI stages."""
    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    root = normalizer.settings.imaging_root
    assert root is not None
    mask = np.zeros((6, 6, 6), dtype=np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), root / "patients" / "seg.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.float32) * 0.5, np.eye(4)), root / "patients" / "density.nii.gz")
    scan = example_of("imaging")
    scan["body"]["voxel_spacing_mm"] = [1.0, 1.0, 1.0]
    scan["body"]["segmentation_uri"] = claim_check(root / "patients" / "seg.nii.gz", root, format="nifti", content="segmentation")
    scan["body"]["measures"]["cellularity_map_uri"] = claim_check(
        root / "patients" / "density.nii.gz", root, format="nifti", content="density"
    )
    found = {kind: example_of(kind) for kind in EVENT_KINDS}
    found["imaging"] = scan
    assert all(isinstance(_only(normalizer, _record(e)), Observation) for e in found.values())
    return found


def _event(kind: str, **changes: Any) -> dict[str, Any]:
    """The example of `kind` with a fresh event id and top-level fields changed."""
    event = example_of(kind)
    event["event_id"] = str(uuid.uuid4())
    event.update(changes)
    return event


def _record(
    event: Any = None, *, raw: bytes | None = None, topic: str | None = None, key: Any = "by body", offset: int = 0
) -> SourceRecord:
    value = raw if raw is not None else json.dumps(event, allow_nan=True).encode()
    if topic is None:
        topic = TOPICS.event_topic(event["kind"])
    if key == "by body":
        key = event.get("patient_id") if isinstance(event, dict) else None
    return SourceRecord(topic, 0, offset, key, value, {}, 1700000000000)


def _only(normalizer: Normalizer, record: SourceRecord) -> Observation | DeadLetter:
    result = normalizer.process([record])
    outcomes = [*result.observations, *result.dead_letters]
    assert len(outcomes) == 1 and not result.duplicates, result
    return outcomes[0]


def _refused(normalizer: Normalizer, record: SourceRecord, stage: str, field: str | None, *words: str) -> DeadLetter:
    dead = _only(normalizer, record)
    assert isinstance(dead, DeadLetter), "expected a dead letter, got an observation"
    assert dead.stage == stage, (dead.stage, dead.reason)
    if field is not None:
        assert field in [issue.field for issue in dead.issues], dead.issues
        assert field in dead.reason, dead.reason
    for word in words:
        assert word in dead.reason, dead.reason
    return dead


# -- 1. times a Kafka record timestamp cannot carry -----------------------------------------


def test_an_event_from_year_one_is_refused_by_the_contract(normalizer: Normalizer) -> None:
    # It passed validation and then made publishing raise (timestamp -62135596800000 ms),
    # which restarted the agent on the same record for good.
    poison = _record(_event("lab", occurred_at="0001-01-01T00:00:00Z"))
    dead = _refused(normalizer, poison, "schema", "occurred_at", "Kafka record timestamps")
    assert dead.event_id is not None
    valid = _record(_event("lab"), offset=1)
    result = normalizer.process([poison, valid])
    assert [o.source.offset for o in result.observations] == [1]
    assert [d.offset for d in result.dead_letters] == [0]


@pytest.mark.parametrize("field", ["occurred_at", "recorded_at"])
def test_every_time_before_the_epoch_is_refused(normalizer: Normalizer, field: str) -> None:
    for text in ("1969-12-31T23:59:59Z", "1970-01-01T00:00:00Z", "1970-01-01T01:00:00+01:00"):
        _refused(normalizer, _record(_event("treatment", **{field: text})), "schema", field, "1970-01-01T00:00:00.001Z")


def test_a_fhir_observation_dated_year_one_is_refused(normalizer: Normalizer) -> None:
    resource = {
        "resourceType": "Observation", "id": "psa-1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
        "subject": {"reference": "Patient/VP-0042"},
        "effectiveDateTime": "0001-01-01",
        "valueQuantity": {"value": 6.8, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"},
    }
    _refused(normalizer, _record(resource, topic=TOPICS.lab, key="VP-0042"), "schema", "occurred_at", "Kafka")


def test_the_last_representable_time_is_refused_as_future_not_as_a_crash(normalizer: Normalizer) -> None:
    # 10000-01-01T23:58:59Z in UTC: a datetime cannot even be converted to UTC there.
    _refused(normalizer, _record(_event("lab", occurred_at="9999-12-31T23:59:59-23:59")), "time", "occurred_at")


def _time_text(moment: datetime, digits: int, offset_minutes: int) -> str:
    zone = timezone(timedelta(minutes=offset_minutes))
    local = moment.astimezone(zone)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{local.microsecond:06d}{'7' * 3}"[:digits]
    hours, minutes = divmod(abs(offset_minutes), 60)
    return text + (f"{'-' if offset_minutes < 0 else '+'}{hours:02d}:{minutes:02d}" if offset_minutes else "Z")


@PROPERTY
@given(
    st.datetimes(
        min_value=datetime(1969, 12, 31, 12), max_value=datetime(2029, 12, 31), timezones=st.just(timezone.utc)
    )
    | st.datetimes(
        min_value=datetime(1969, 12, 31, 23, 59, 59), max_value=datetime(1970, 1, 1, 0, 0, 0, 2000),
        timezones=st.just(timezone.utc),
    ),
    st.integers(min_value=0, max_value=9),
    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
)
@example(EARLIEST_TIME, 3, 0)
@example(EARLIEST_TIME - timedelta(microseconds=1), 6, 60)
def test_what_the_normalizer_emits_has_a_positive_kafka_timestamp(
    normalizer: Normalizer, moment: datetime, digits: int, offset_minutes: int
) -> None:
    text = _time_text(moment, digits, offset_minutes)
    instant = datetime.fromisoformat(text)  # what the text says, digits beyond µs dropped
    outcome = _only(normalizer, _record(_event("lab", occurred_at=text)))
    if instant >= EARLIEST_TIME:
        assert isinstance(outcome, Observation), (text, getattr(outcome, "reason", ""))
        assert outcome.timestamp_ms > 0
        assert outcome.timestamp_ms == round(instant.timestamp() * 1000)
    else:
        assert isinstance(outcome, DeadLetter) and outcome.stage == "schema", text
        assert [issue.field for issue in outcome.issues] == ["occurred_at"]


# -- 4. an object with a key twice ----------------------------------------------------------


def test_a_second_patient_id_is_refused_not_taken(normalizer: Normalizer) -> None:
    # The last value used to win: the body named VP-0001 first and became VP-0666's observation.
    event = _event("lab", patient_id="VP-0001")
    raw = json.dumps(event).encode().replace(b'"VP-0001"', b'"VP-0001", "patient_id": "VP-0666"', 1)
    assert raw.count(b'"patient_id"') == 2 and json.loads(raw)["patient_id"] == "VP-0666"
    dead = _refused(normalizer, _record(raw=raw, topic=TOPICS.lab, key=None), "parse", "patient_id", "more than once")
    assert "VP-0666" not in dead.reason and "VP-0001" not in dead.reason


@pytest.mark.parametrize(
    ("kind", "where", "path"),
    [
        ("lab", b'"unit": ', "body.unit"),
        ("imaging", b'"sha256": ', "body.dicom_uri.sha256"),
    ],
)
def test_a_key_twice_deeper_in_the_body_is_refused_with_its_path(
    normalizer: Normalizer, kind: str, where: bytes, path: str
) -> None:
    raw = json.dumps(_event(kind)).encode()
    head, _, tail = raw.partition(where)
    value, comma, rest = tail.partition(b",")
    raw = head + where + value + comma + b" " + where + value + comma + rest  # the same pair twice
    _refused(normalizer, _record(raw=raw, topic=TOPICS.event_topic(kind), key=None), "parse", path, "more than once")


def test_a_fhir_resource_with_a_key_twice_is_refused(normalizer: Normalizer) -> None:
    raw = (
        b'{"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org",'
        b' "code": "2857-1", "code": "19197-3"}]}, "subject": {"reference": "Patient/VP-0042"},'
        b' "effectiveDateTime": "2024-02-12T08:40:00Z", "valueQuantity": {"value": 6.8, "code": "ng/mL"}}'
    )
    _refused(normalizer, _record(raw=raw, topic=TOPICS.lab, key=None), "parse", "code.coding[0].code", "more than once")


def test_escaped_colons_neither_hide_a_key_twice_nor_raise_a_false_alarm(normalizer: Normalizer) -> None:
    # The quick check counts colons; a colon written as \u003a is handled by the full parse.
    event = _event("lab", source="lis:feed")
    raw = json.dumps(event).encode().replace(b"lis:feed", b"lis\\u003afeed")
    assert isinstance(_only(normalizer, _record(event, raw=raw)), Observation)
    twice = raw.replace(b'"source": ', b'"source": "a\\u003ab", "source": ', 1)
    _refused(normalizer, _record(event, raw=twice), "parse", "source", "more than once")


class _Object(tuple):  # type: ignore[type-arg]
    """A generated JSON object: its pairs in order, a key possibly more than once."""


_KEYS = st.sampled_from(["a", "b", "a:b", ":", 'q"', "\\", "\u00e9", "\u2028", "patient_id"])
_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(
    st.sampled_from(["a", ":", '"', "\\", "\u00e9", " ", "\n"]), max_size=6
)
_TREES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.lists(st.tuples(_KEYS, inner), max_size=4).map(_Object),
    max_leaves=10,
)


def _has_a_key_twice(node: Any) -> bool:
    if isinstance(node, _Object):
        keys = [k for k, _ in node]
        return len(set(keys)) < len(keys) or any(_has_a_key_twice(v) for _, v in node)
    if isinstance(node, list):
        return any(_has_a_key_twice(v) for v in node)
    return False


def _json_text(node: Any, escape: bool, space: str) -> str:
    if isinstance(node, _Object):
        pairs = (f"{_json_text(k, escape, space)}{space}:{space}{_json_text(v, escape, space)}" for k, v in node)
        return "{" + f",{space}".join(pairs) + "}"
    if isinstance(node, list):
        return "[" + f",{space}".join(_json_text(v, escape, space) for v in node) + "]"
    text = json.dumps(node, ensure_ascii=False)
    return text.replace(":", "\\u003a") if escape and isinstance(node, str) else text


@PROPERTY
@given(st.lists(st.tuples(_KEYS, _TREES), max_size=5).map(_Object), st.booleans(), st.sampled_from(["", " ", "\n\t"]))
def test_a_key_twice_anywhere_is_found_and_only_then(
    normalizer: Normalizer, document: _Object, escape: bool, space: str
) -> None:
    raw = _json_text(document, escape, space).encode()
    outcome = _only(normalizer, _record(raw=raw, topic=TOPICS.lab, key=None))
    assert isinstance(outcome, DeadLetter)  # none of these is an event
    assert ("more than once" in outcome.reason) == _has_a_key_twice(document), (raw, outcome.reason)
    assert outcome.stage == ("parse" if _has_a_key_twice(document) else "schema"), outcome.reason


# -- 5. a record key that is not the body's patient -----------------------------------------


def test_a_record_keyed_for_another_patient_is_refused(normalizer: Normalizer) -> None:
    event = _event("lab", patient_id="VP-0042")
    dead = _refused(normalizer, _record(event, key="VP-0777"), "routing", "patient_id", "record key")
    assert "VP-0042" not in dead.reason and "VP-0777" not in dead.reason  # reasons are logged
    assert dead.key == "VP-0777"  # the record itself is kept whole
    for key in (None, "", "VP-0042"):  # no key (or an empty one) is allowed
        assert isinstance(_only(normalizer, _record(_event("lab", patient_id="VP-0042"), key=key)), Observation)


def test_a_fhir_record_keyed_for_another_patient_is_refused(normalizer: Normalizer) -> None:
    resource = {
        "resourceType": "Observation", "id": "psa-2", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
        "subject": {"reference": "Patient/VP-0042"},
        "effectiveDateTime": "2024-02-12T08:40:00Z",
        "valueQuantity": {"value": 6.8, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"},
    }
    _refused(normalizer, _record(resource, topic=TOPICS.lab, key="VP-0043"), "routing", "patient_id")
    assert isinstance(_only(normalizer, _record(resource, topic=TOPICS.lab, key="VP-0042")), Observation)


# -- 6. other encodings than UTF-8 ----------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_a_bom_utf16_or_utf32_is_refused_though_json_would_read_it(normalizer: Normalizer, encoding: str) -> None:
    event = _event("lab")
    raw = json.dumps(event).encode(encoding)
    assert json.loads(raw) == event  # the standard library guesses the encoding and accepts it
    _refused(normalizer, _record(event, raw=raw), "parse", None, "UTF-8 JSON without a byte-order mark")


def test_a_bom_alone_or_before_garbage_is_refused_as_such(normalizer: Normalizer) -> None:
    for raw in (codecs.BOM_UTF8, codecs.BOM_UTF16_LE + b"\x00garbage", codecs.BOM_UTF32_BE):
        _refused(normalizer, _record(raw=raw, topic=TOPICS.lab, key=None), "parse", None, "byte-order mark")


# -- 7. bad input that used to fail as an internal error ------------------------------------


@pytest.mark.parametrize(
    "uri",
    ["patients/VP-0001/seg\x00.nii.gz", "file:///patients/x%00y.nii.gz", "\x00"],
    ids=["relative", "file-uri-percent", "alone"],
)
def test_a_nul_in_a_claim_check_path_is_a_claim_check_dead_letter(normalizer: Normalizer, uri: str) -> None:
    event = _event("imaging")
    event["body"]["segmentation_uri"]["uri"] = uri
    _refused(normalizer, _record(event), "claim-check", "body.segmentation_uri.uri", "NUL")


def test_a_broken_file_uri_host_is_a_claim_check_dead_letter(normalizer: Normalizer) -> None:
    event = _event("imaging")
    event["body"]["segmentation_uri"]["uri"] = "file://[broken/x.nii.gz"
    _refused(normalizer, _record(event), "claim-check", "body.segmentation_uri.uri", "file: URI")


def test_an_unreadable_claim_check_file_is_a_claim_check_dead_letter(
    normalizer: Normalizer, templates: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_permission(path: Any, info: Any) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imaging, "_sha256", no_permission)
    event = _fresh(templates["imaging"])
    _refused(normalizer, _record(event), "claim-check", "body.segmentation_uri.uri", "cannot be read (PermissionError)")


@pytest.mark.parametrize("planned", [1e12, 2**64, 10**400, 1001])
def test_an_absurd_fraction_count_is_refused_by_the_contract(normalizer: Normalizer, planned: float) -> None:
    event = _event("treatment")
    event["body"]["fractions_planned"] = planned
    _refused(normalizer, _record(event), "schema", "body.fractions_planned")


def test_a_fraction_count_written_as_a_float_normalizes(normalizer: Normalizer) -> None:
    # "integer" admits 30.0; its RDF used to fail SHACL with "TypeError (internal)".
    event = _event("treatment")
    event["body"].update(fraction_number=2.0, fractions_planned=30.0)
    outcome = _only(normalizer, _record(event))
    assert isinstance(outcome, Observation), getattr(outcome, "reason", "")
    assert decode_jsonld(outcome.value).fraction_number == 2


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("lab", "body.value"),
        ("ctdna", "body.value"),
        ("imaging", "body.measures.tumor_volume.value"),
        ("imaging", "body.dicom_uri.size"),
        ("imaging", "body.voxel_spacing_mm[0]"),
        ("treatment", "body.dose.value"),
        ("treatment", "body.fraction_number"),
    ],
)
def test_two_to_the_64_is_refused_wherever_a_number_goes(normalizer: Normalizer, kind: str, path: str) -> None:
    event = _event(kind)
    node: Any = event
    *parents, last = path.replace("[0]", ".0").split(".")
    for part in parents:
        node = node[part]
    node[int(last) if last.isdigit() else last] = 2**64
    _refused(normalizer, _record(event), "schema", path, "maximum")


def _nested(depth: int) -> Any:
    node: Any = 1
    for level in range(depth):
        node = [node] if level % 2 else {"a": node}
    return node


@pytest.mark.parametrize("depth", [100, 300, 1000, 5000])
def test_deep_nesting_is_refused_with_a_reason(normalizer: Normalizer, depth: int) -> None:
    # 255 to 1024 levels: orjson reads them but cannot write them back (its writer stops at 254).
    raw = b'{"a": ' * depth + b"1" + b"}" * depth
    dead = _only(normalizer, _record(raw=raw, topic=TOPICS.lab, key=None))
    assert isinstance(dead, DeadLetter) and dead.stage in ("parse", "schema"), dead
    assert "nested" in dead.reason, dead.reason
    event = _event("lab")
    event["body"]["method"] = _nested(min(depth, 300))
    dead = _only(normalizer, _record(event))
    assert isinstance(dead, DeadLetter) and dead.stage == "schema", dead


# -- any record at all ----------------------------------------------------------------------

_HOSTILE_NUMBERS = [0, -1, 0.5, 30.0, 2**53 + 1, 2**63, 2**64, -(2**64), 10**30, 10**400, 1e12, 1e308, 5e-324, math.nan, math.inf]
_HOSTILE_TIMES = [
    "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "1970-01-01T00:00:00.001Z", "9999-12-31T23:59:59-23:59",
    "2029-12-31T23:59:59+14:00", "2030-01-05T00:00:00Z", "2024-02-30T00:00:00Z", "2024-02-12T08:40:00",
]
_HOSTILE_PATHS = [
    "patients/\x00/seg.nii.gz", "patients/seg.nii.gz\x00", "file:///x%00y", "file://[x/y", "file://other-host/x",
    "file:///etc/passwd", "../etc/passwd", "patients", "patients/", "patients/seg.nii.gz/x", "patients/density.nii.gz",
    "p" * 300 + "/x", "/".join(["p" * 200] * 30), DICOMWEB + "/studies/\x00", DICOMWEB + "/../x", DICOMWEB,
    "http://pacs.example.org/dicomweb/x", "patients/%2e%2e/x", "patients/\u2028",
]
_HOSTILE_VALUES = st.sampled_from(
    [
        *_HOSTILE_NUMBERS, *_HOSTILE_TIMES, *_HOSTILE_PATHS, None, True, "", " ", "\x00", "a\x00b", "\ud800",
        "\u2028", "x" * 3000, "DOE^JOHN", "VP-0001", [], {}, [[[[[[]]]]]], {"a": {"b": [1, {"c": None}]}}, _nested(300),
        {"resourceType": "Observation"},
    ]
) | st.text(max_size=12) | st.integers() | st.floats()


_PROBED = frozenset({"uri", "occurred_at", "recorded_at", "value", "size", "fraction_number", "fractions_planned"})


def _hostile_for(where: tuple[Any, ...]) -> st.SearchStrategy[Any]:
    """Values that probe the field at `where` (a path, a time, a number), or anything."""
    last = where[-1]
    if last == "uri":
        return st.sampled_from(_HOSTILE_PATHS) | _HOSTILE_VALUES
    if last in ("occurred_at", "recorded_at"):
        return st.sampled_from(_HOSTILE_TIMES) | _HOSTILE_VALUES
    if last in ("value", "size", "fraction_number", "fractions_planned") or isinstance(last, int):
        return st.sampled_from(_HOSTILE_NUMBERS) | _HOSTILE_VALUES
    return _HOSTILE_VALUES


def _locations(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _locations(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _locations(value, (*prefix, index))
    return found


def _fresh(template: dict[str, Any]) -> dict[str, Any]:
    return {**copy.deepcopy(template), "event_id": str(uuid.uuid4())}


def _probes(document: Any) -> list[tuple[Any, ...]]:
    """Where a change reaches the later stages: claim checks, times, numbers."""
    return [w for w in _locations(document) if w and (w[-1] in _PROBED or isinstance(w[-1], int))]


@st.composite
def _mutated_event(draw: st.DrawFn, templates: dict[str, dict[str, Any]], *, deep: bool) -> dict[str, Any]:
    """A valid event with fields replaced, removed or added: one probed field if `deep`, else
    up to three anywhere."""
    document: Any = _fresh(templates[draw(st.sampled_from(EVENT_KINDS))])
    if deep:
        where = draw(st.sampled_from(_probes(document)))
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        parent[where[-1]] = copy.deepcopy(draw(_hostile_for(where)))
        return document  # type: ignore[no-any-return]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.sampled_from([w for w in _locations(document) if w]))
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        # Copies: a sampled list or object is one shared instance, which a later "add" would change.
        if action == "replace":
            parent[where[-1]] = copy.deepcopy(draw(_hostile_for(where)))
        elif action == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = copy.deepcopy(draw(_HOSTILE_VALUES))
    return document  # type: ignore[no-any-return]


@st.composite
def _hostile_value(draw: st.DrawFn, document: Any) -> bytes:
    """`document` as bytes, written in one of the ways a feed gets it wrong (or right)."""
    text = json.dumps(document, allow_nan=True, ensure_ascii=draw(st.booleans()))
    way = draw(st.sampled_from(["plain", "plain", "bom", "utf-16", "utf-32", "cut", "flip", "twice", "bytes"]))
    raw = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8
    if way == "bom":
        return codecs.BOM_UTF8 + raw
    if way in ("utf-16", "utf-32"):
        return text.encode(way, "surrogatepass")
    if way == "cut":
        return raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    if way == "flip":
        at = draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    if way == "twice" and raw.startswith(b"{") and b'": ' in raw:
        key = raw[1 : raw.index(b'": ') + 3]  # the first key, repeated up front
        return b"{" + key + b"null, " + raw[1:]
    if way == "bytes":
        return draw(st.binary(max_size=64))
    return raw


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)  # keys and headers arrive decoded


@st.composite
def _hostile_record(draw: st.DrawFn, templates: dict[str, dict[str, Any]], offset: int) -> SourceRecord:
    """Half the time a record as a feed sends it but for one probed field (so that it reaches
    the claim-check, time and later stages), else anything: topic, key, headers, bytes."""
    deep = draw(st.booleans())
    document = draw(_mutated_event(templates, deep=deep))
    patient = document.get("patient_id") if isinstance(document.get("patient_id"), str) else None
    if deep:
        value = json.dumps(document, allow_nan=True).encode("utf-8", "surrogatepass")
        return SourceRecord(TOPICS.event_topic(document["kind"]), 0, offset, patient, value, {}, None)
    topic = draw(st.sampled_from([TOPICS.event_topic(k) for k in EVENT_KINDS]))
    key = draw(st.sampled_from([patient, None, ""]) | _TEXT | st.just("k" * 2000))
    headers = draw(st.dictionaries(_TEXT, _TEXT, max_size=3))
    return SourceRecord(topic, draw(st.integers(0, 3)), offset, key, draw(_hostile_value(document)), headers, None)


@st.composite
def _batches(draw: st.DrawFn, templates: dict[str, dict[str, Any]]) -> tuple[list[SourceRecord], set[int]]:
    """Hostile records with valid events among them; returns the batch and the valid offsets."""
    records: list[SourceRecord] = []
    valid: set[int] = set()
    for offset in range(draw(st.integers(min_value=1, max_value=6))):
        choice = draw(st.sampled_from(["hostile", "hostile", "valid", "again"]))
        if choice == "valid":
            records.append(_record(_fresh(templates[draw(st.sampled_from(EVENT_KINDS))]), offset=offset))
            valid.add(offset)
        elif choice == "again" and records:  # redelivered as it was
            before = draw(st.sampled_from(records))
            records.append(SourceRecord(before.topic, before.partition, offset, before.key, before.value, before.headers))
        else:
            records.append(draw(_hostile_record(templates, offset)))
    return records, valid


@PROPERTY
@given(data=st.data())
def test_any_record_gets_exactly_one_outcome_and_spoils_nothing(
    normalizer: Normalizer, templates: dict[str, dict[str, Any]], data: st.DataObject
) -> None:
    records, valid = data.draw(_batches(templates))
    result = normalizer.process(records)  # must not raise, whatever the records hold
    offsets = Counter(
        [o.source.offset for o in result.observations]
        + [d.offset for d in result.dead_letters]
        + [r.offset for _, r in result.duplicates]
    )
    assert offsets == Counter(r.offset for r in records)  # one outcome per record, none lost
    internal = [(d.offset, d.reason) for d in result.dead_letters if d.stage == "internal"]
    assert not internal
    published = {o.source.offset for o in result.observations}
    assert valid <= published  # the valid events around the hostile ones all come out
    ids = [o.event_id for o in result.observations]
    assert len(ids) == len(set(ids))  # nothing applied twice
    for observation in result.observations:
        assert observation.timestamp_ms > 0 and observation.value
        assert observation.source.key in (None, "", observation.patient_id)
    for dead in result.dead_letters:
        assert dead.reason and json.loads(dead.to_bytes())["stage"] == dead.stage


def test_a_batch_of_every_named_case_still_publishes_its_valid_events(normalizer: Normalizer) -> None:
    year_one = _event("lab", occurred_at="0001-01-01T00:00:00Z")
    twice = json.dumps(_event("lab")).encode().replace(b'"source": ', b'"source": "x", "source": ', 1)
    nul = _event("imaging")
    nul["body"]["segmentation_uri"]["uri"] = "patients/\x00"
    huge = _event("treatment")
    huge["body"]["fractions_planned"] = 2**64
    hostile = [
        _record(year_one),
        _record(raw=twice, topic=TOPICS.lab, key=None),
        _record(_event("lab", patient_id="VP-0042"), key="VP-0777"),
        _record(raw=json.dumps(_event("lab")).encode("utf-16"), topic=TOPICS.lab, key=None),
        _record(nul),
        _record(huge),
    ]
    valid = [_record(_event(kind)) for kind in ("lab", "ctdna", "treatment")]
    batch = [SourceRecord(r.topic, 0, i, r.key, r.value) for i, r in enumerate([*hostile, *valid])]
    result = normalizer.process(batch)
    assert [d.stage for d in result.dead_letters] == ["schema", "parse", "routing", "parse", "claim-check", "schema"]
    assert [o.source.offset for o in result.observations] == [6, 7, 8]


def test_an_internal_failure_logs_where_not_what(caplog, monkeypatch):
    # A failure no stage catches becomes an internal dead letter; its message (which can quote
    # the record's values) stays in the dead letter, the log line names type and place only.
    from stream import normalizer as module

    def boom(*args, **kwargs):
        raise ValueError("could not use 'DOE^JOHN' 4242.4242")

    monkeypatch.setattr(module, "build_event_graph", boom)
    norm = module.Normalizer(module.NormalizerSettings(), module.Topics())
    event = example_of("lab")
    record = module.SourceRecord("oncotwin.events.lab.v1", 0, 7, event["patient_id"], json.dumps(event).encode())
    with caplog.at_level(logging.DEBUG):
        result = norm.process([record])
    assert [d.stage for d in result.dead_letters] == ["internal"]
    assert "DOE^JOHN" in result.dead_letters[0].reason
    assert "ValueError" in caplog.text and "DOE^JOHN" not in caplog.text and "4242" not in caplog.text
