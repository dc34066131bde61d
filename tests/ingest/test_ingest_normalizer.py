"""The normalizer as a pure function of records (no broker): every stage, good and bad input."""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from ingest_support import dicom_file, local_dicom_testdata

from schemas import example
from stream.deadletter import DeadLetter, original_bytes
from stream.decode import decode_jsonld
from stream.normalizer import Normalizer, NormalizerSettings, Observation, SourceRecord
from stream.topics import Topics
from stream.volumes import claim_check

TOPICS = Topics("unit")
NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)  # after every virtual cohort date


def _normalizer(root: Path | None, **overrides) -> Normalizer:
    settings = NormalizerSettings(imaging_root=root, **overrides)
    return Normalizer(settings, TOPICS, clock=lambda: NOW)


_BY_BODY = "the event's patient_id"


def _record(
    event: object, kind: str | None = None, *, raw: bytes | None = None, offset: int = 0, key: str | None = _BY_BODY
) -> SourceRecord:
    """A record as a feed sends it: keyed by the event's patient_id (VP-0001 where it has none)."""
    if kind is None:
        kind = event["kind"]  # type: ignore[index]
    if key is _BY_BODY:
        patient = event.get("patient_id") if isinstance(event, dict) else None
        key = patient if isinstance(patient, str) else "VP-0001"
    value = raw if raw is not None else json.dumps(event, allow_nan=True).encode()
    return SourceRecord(TOPICS.event_topic(kind), 1, offset, key, value, {"content-type": "application/json"}, 1700000000000)


def _one(normalizer: Normalizer, record: SourceRecord) -> Observation | DeadLetter:
    result = normalizer.process([record])
    outcomes = [*result.observations, *result.dead_letters]
    assert len(outcomes) == 1
    return outcomes[0]


def _dead(normalizer: Normalizer, record: SourceRecord, stage: str, *words: str) -> DeadLetter:
    outcome = _one(normalizer, record)
    assert isinstance(outcome, DeadLetter), f"expected a dead letter ({stage}), got an observation"
    assert outcome.stage == stage, outcome.reason
    for word in words:
        assert word in outcome.reason, outcome.reason
    document = json.loads(outcome.to_bytes())
    # What a person needs: the original bytes, where the record came from, why.
    assert original_bytes(document) == record.value
    assert document["source"] == {
        "topic": record.topic, "partition": 1, "offset": record.offset, "key": record.key,
        "timestamp_ms": 1700000000000, "headers": {"content-type": "application/json"},
    }
    return outcome


def _with_id(event: dict) -> dict:
    event = copy.deepcopy(event)
    event["event_id"] = str(uuid.uuid4())
    return event


# -- good input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lab", "ctdna", "treatment"])
def test_each_kind_becomes_one_observation(kind: str) -> None:
    event = example(kind)
    outcome = _one(_normalizer(None), _record(event))
    assert isinstance(outcome, Observation)
    assert outcome.key == event["patient_id"]
    assert outcome.headers["content-type"] == "application/ld+json"
    assert outcome.headers["event-id"] == event["event_id"] and outcome.headers["kind"] == kind
    assert outcome.headers["schema-version"] == "1.0"
    assert outcome.timestamp_ms == int(datetime.fromisoformat(event["occurred_at"]).timestamp() * 1000)
    assert decode_jsonld(outcome.value).event_id == event["event_id"]


def test_virtual_cohort_normalizes_with_verified_claim_checks(cohort: Path, cohort_events: list[dict]) -> None:
    normalizer = _normalizer(cohort)
    records = [_record(e, offset=i) for i, e in enumerate(cohort_events)]
    result = normalizer.process(records)
    assert not result.dead_letters, [d.reason for d in result.dead_letters]
    assert len(result.observations) == len(cohort_events)
    scans = [decode_jsonld(o.value) for o in result.observations if o.kind == "imaging"]
    assert scans
    for scan, event in zip(scans, [e for e in cohort_events if e["kind"] == "imaging"]):
        reported = event["body"]["measures"]["tumor_volume"]["value"]
        assert scan.volume_ml == pytest.approx(reported, abs=1e-3)  # derived from the segmentation
        assert scan.reported_value == reported
        assert scan.segmentation is not None and scan.segmentation.verified
        assert scan.density_map is not None and scan.density_map.verified
        assert scan.centroid_mm is not None
        # The centroid lies inside the 16 x 5 mm grid.
        assert all(0 <= c <= 80 for c in scan.centroid_mm)


def test_duplicates_produce_one_observation() -> None:
    event = example("lab")
    normalizer = _normalizer(None)
    result = normalizer.process([_record(event, offset=0), _record(event, offset=1)])
    assert len(result.observations) == 1 and len(result.duplicates) == 1
    again = normalizer.process([_record(event, offset=2)], seen=lambda event_id: event_id == event["event_id"])
    assert not again.observations and not again.dead_letters and len(again.duplicates) == 1


# -- bad input ------------------------------------------------------------------------------


def test_malformed_and_empty_records() -> None:
    n = _normalizer(None)
    _dead(n, _record(None, "lab", raw=b'{"event_id": '), "parse", "not valid JSON")
    _dead(n, _record(None, "lab", raw=b"\xff\xfe\x00garbage"), "parse")
    _dead(n, _record(None, "lab", raw=b""), "size", "no value")


@pytest.mark.parametrize("where", ["body.method", "body.note-key"])
def test_a_lone_surrogate_escape_is_dead_lettered_not_a_crash(where: str) -> None:
    # Python's json accepts "\ud800" (no character); orjson, Kafka's UTF-8 and Oxigraph do not.
    event = _with_id(example("lab"))
    if where == "body.method":
        event["body"]["method"] = "immuno\ud800assay"
    else:
        event["body"]["\udfff"] = "x"
    raw = json.dumps(event).encode()  # ensure_ascii: the escape travels as text
    assert b"\\ud800" in raw or b"\\udfff" in raw
    good = _record(_with_id(example("ctdna")), offset=1)
    result = _normalizer(None).process([_record(event, raw=raw), good])
    assert len(result.observations) == 1 and len(result.dead_letters) == 1
    dead = result.dead_letters[0]
    assert dead.stage == "parse" and "lone UTF-16 surrogate" in dead.reason
    assert dead.reason.startswith("$.body.method" if where == "body.method" else "$.body (a key)")
    assert original_bytes(json.loads(dead.to_bytes())) == raw


def test_schema_violation_names_the_field() -> None:
    event = example("lab")
    del event["body"]["value"]
    dead = _dead(_normalizer(None), _record(event), "schema", "body.value")
    assert dead.event_id == event["event_id"] and dead.kind == "lab"
    assert any(i.field == "body.value" for i in dead.issues)


def test_unknown_code_and_unknown_unit() -> None:
    n = _normalizer(None)
    event = example("lab")
    event["body"]["code"] = "99999-9"
    _dead(n, _record(event), "code", "99999-9", "LOINC")
    event = example("lab")
    event["body"]["unit"] = "NG/ML"
    _dead(n, _record(event), "unit", "NG/ML", "did you mean 'ng/mL'")


def test_a_unit_with_ucums_other_litre_code_normalizes() -> None:
    # Laboratory systems often send "ng/ml": UCUM's "l" is the litre as much as "L".
    event = _with_id(example("lab"))
    event["body"]["unit"] = "ng/" + "ml"
    outcome = _one(_normalizer(None), _record(event))
    assert isinstance(outcome, Observation), getattr(outcome, "reason", "")
    decoded = decode_jsonld(outcome.value)
    assert decoded.unit == "ng/mL" and decoded.value == event["body"]["value"]
    assert '"ng/ml"' in outcome.ntriples  # the unit as reported is kept beside the canonical one


def test_nan_and_negative_values() -> None:
    n = _normalizer(None)
    event = example("lab")
    event["body"]["value"] = float("nan")
    raw = json.dumps(event, allow_nan=True).encode()
    assert b"NaN" in raw
    _dead(n, _record(event, raw=raw), "schema", "finite")
    event = example("ctdna")
    event["body"]["value"] = -0.5
    _dead(n, _record(event), "schema", "body.value")
    event = example("treatment")
    event["body"]["dose"]["value"] = -2.0
    _dead(n, _record(event), "schema", "body.dose.value")


def test_oversize_record() -> None:
    event = example("lab")
    event["body"]["method"] = "x" * 500
    n = _normalizer(None, max_record_bytes=400)
    _dead(n, _record(event), "size", "more than the 400")


def test_event_far_in_the_future() -> None:
    event = example("lab")
    event["occurred_at"] = (NOW + timedelta(days=3)).isoformat()
    _dead(_normalizer(None), _record(event), "time", "in the future")
    event["occurred_at"] = (NOW + timedelta(hours=3)).isoformat()  # within the skew
    assert isinstance(_one(_normalizer(None), _record(event)), Observation)


def test_kind_must_match_the_topic() -> None:
    event = example("lab")
    _dead(_normalizer(None), _record(event, "ctdna"), "routing", TOPICS.lab)


def test_fhir_only_on_lab_and_ctdna_topics() -> None:
    resource = {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/VP-0001"}}
    _dead(_normalizer(None), _record(resource, "treatment"), "fhir", "lab and ctdna topics")


def test_fhir_subject_must_be_a_pseudonym() -> None:
    resource = {
        "resourceType": "Observation", "id": "psa-1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
        "subject": {"reference": "Patient/John Smith 1961"},
        "effectiveDateTime": "2024-02-12T08:40:00Z",
        "valueQuantity": {"value": 6.8, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"},
    }
    dead = _dead(_normalizer(None), _record(resource, "lab"), "fhir", "pseudonym")
    assert "John" not in dead.reason  # the reference is not echoed
    resource["subject"]["reference"] = "Patient/VP-0042"
    outcome = _one(_normalizer(None), _record(resource, "lab", key="VP-0042"))
    assert isinstance(outcome, Observation) and outcome.patient_id == "VP-0042"


def test_a_bad_record_does_not_spoil_its_batch() -> None:
    good = [_record(_with_id(example(k)), offset=i) for i, k in enumerate(["lab", "ctdna", "treatment"])]
    bad = [_record(None, "lab", raw=b"nope", offset=9)]
    result = _normalizer(None).process([good[0], *bad, *good[1:]])
    assert len(result.observations) == 3 and len(result.dead_letters) == 1


def test_a_failure_no_stage_catches_dead_letters_only_its_record() -> None:
    records = [_record(_with_id(example(k)), offset=i) for i, k in enumerate(["lab", "ctdna", "treatment", "lab"])]
    poison = json.loads(records[1].value)["event_id"]
    again = records[2]  # the same event twice in the batch: still one observation

    def seen(event_id: str) -> bool:
        if event_id == poison:
            raise RuntimeError("a bug that no stage expects")
        return False

    result = _normalizer(None).process([*records, again], seen=seen)
    assert [o.event_id for o in result.observations] == [json.loads(records[i].value)["event_id"] for i in (0, 2, 3)]
    assert [(d.stage, d.offset) for d in result.dead_letters] == [("internal", 1)]
    assert "RuntimeError" in result.dead_letters[0].reason
    assert [eid for eid, _ in result.duplicates] == [json.loads(again.value)["event_id"]]


# -- imaging claim checks -------------------------------------------------------------------


def _scan(root: Path, seg: Path, **body_changes) -> dict:
    event = example("imaging")
    event["event_id"] = str(uuid.uuid4())
    body = event["body"]
    body.pop("dicom_uri")
    body["segmentation_uri"] = claim_check(seg, root, format="nifti", content="segmentation")
    body["voxel_spacing_mm"] = [5.0, 5.0, 5.0]
    body["measures"] = {}
    body.update(body_changes)
    return event


@pytest.fixture
def imaging_root(tmp_path: Path, cohort: Path) -> Path:
    root = tmp_path / "root"
    seg = next(cohort.glob("*/mri-*-seg.nii.gz"))
    (root / "p").mkdir(parents=True)
    shutil.copy(seg, root / "p" / "seg.nii.gz")
    return root


def test_claim_checks_outside_the_root_are_refused(imaging_root: Path, tmp_path: Path) -> None:
    n = _normalizer(imaging_root)
    seg = imaging_root / "p" / "seg.nii.gz"
    good = _scan(imaging_root, seg)
    assert isinstance(_one(n, _record(good)), Observation)

    dotdot = _scan(imaging_root, seg)
    dotdot["body"]["segmentation_uri"]["uri"] = "p/../../outside.nii.gz"
    _dead(n, _record(dotdot), "schema", "body.segmentation_uri.uri")

    absolute = _scan(imaging_root, seg)
    absolute["body"]["segmentation_uri"]["uri"] = "/etc/passwd"
    _dead(n, _record(absolute), "schema", "body.segmentation_uri.uri")

    outside = tmp_path / "outside.nii.gz"
    shutil.copy(seg, outside)
    file_uri = _scan(imaging_root, seg)
    file_uri["body"]["segmentation_uri"]["uri"] = outside.as_uri()
    _dead(n, _record(file_uri), "claim-check", "outside the imaging root")

    (imaging_root / "p" / "link.nii.gz").symlink_to(outside)
    link = _scan(imaging_root, seg)
    link["body"]["segmentation_uri"]["uri"] = "p/link.nii.gz"
    _dead(n, _record(link), "claim-check", "symbolic link")

    url = example("imaging")  # its dicom_uri is a DICOMweb URL
    url["body"].pop("segmentation_uri")
    url["body"]["measures"].pop("cellularity_map_uri")
    _dead(n, _record(url), "claim-check", "no DICOMweb base is configured")
    with_base = _normalizer(imaging_root, dicomweb_base="https://pacs.example.org/dicomweb")
    accepted = _one(with_base, _record(url))
    assert isinstance(accepted, Observation)
    assert decode_jsonld(accepted.value).dicom.verified is False  # referenced, not fetched
    elsewhere = _normalizer(imaging_root, dicomweb_base="https://other.example.org/dicomweb")
    _dead(elsewhere, _record(url), "claim-check", "not under the configured DICOMweb base")


def test_claim_check_digest_size_and_spacing(imaging_root: Path) -> None:
    n = _normalizer(imaging_root)
    seg = imaging_root / "p" / "seg.nii.gz"
    wrong_hash = _scan(imaging_root, seg)
    wrong_hash["body"]["segmentation_uri"]["sha256"] = "0" * 64
    _dead(n, _record(wrong_hash), "claim-check", "SHA-256")
    wrong_size = _scan(imaging_root, seg)
    wrong_size["body"]["segmentation_uri"]["size"] += 1
    _dead(n, _record(wrong_size), "claim-check", "bytes")
    missing = _scan(imaging_root, seg)
    missing["body"]["segmentation_uri"]["uri"] = "p/none.nii.gz"
    _dead(n, _record(missing), "claim-check", "does not exist")
    spacing = _scan(imaging_root, seg, voxel_spacing_mm=[1.0, 1.0, 1.0])
    _dead(n, _record(spacing), "nifti", "voxel spacing")
    no_root = _normalizer(None)
    _dead(no_root, _record(_scan(imaging_root, seg)), "claim-check", "no imaging root")


# -- DICOM ----------------------------------------------------------------------------------


def _dicom_event(root: Path, path: Path, *, modality: str | None = None, study: str | None = None) -> dict:
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    event = example("imaging")
    event["event_id"] = str(uuid.uuid4())
    body = event["body"]
    body.pop("segmentation_uri")
    body["measures"] = {}
    body["modality"] = modality or str(header.get("Modality", "MR"))
    body["study_uid"] = study or str(header.get("StudyInstanceUID", "1.2.3"))
    body["series_uid"] = str(header.get("SeriesInstanceUID", "1.2.3.4"))
    body["dicom_uri"] = claim_check(path, root, format="dicom")
    study_date = str(header.get("StudyDate", "") or "20040119")
    event["occurred_at"] = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:8]}T10:00:00Z"
    event["recorded_at"] = event["occurred_at"]
    return event


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_valid_dicom_passes_the_header_checks(tmp_path: Path, name: str) -> None:
    shutil.copy(dicom_file(name), tmp_path / name)
    event = _dicom_event(tmp_path, tmp_path / name)
    outcome = _one(_normalizer(tmp_path), _record(event))
    assert isinstance(outcome, Observation), getattr(outcome, "reason", "")
    decoded = decode_jsonld(outcome.value)
    assert decoded.resource_type == "ImagingStudy" and decoded.dicom.verified
    assert decoded.study_uid == event["body"]["study_uid"]
    # Nothing identifying from the DICOM header reaches the published graph.
    header = pydicom.dcmread(tmp_path / name, stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID"):
        value = str(header.get(keyword, "") or "")
        if value:
            assert value.encode() not in outcome.value


def test_dicom_that_does_not_match_the_event(tmp_path: Path) -> None:
    shutil.copy(dicom_file("MR_small.dcm"), tmp_path / "mr.dcm")
    n = _normalizer(tmp_path)
    _dead(n, _record(_dicom_event(tmp_path, tmp_path / "mr.dcm", study="1.2.3.4.5")), "dicom", "(0020,000D)", "1.2.3.4.5")
    _dead(n, _record(_dicom_event(tmp_path, tmp_path / "mr.dcm", modality="CT")), "dicom", "(0008,0060)")
    late = _dicom_event(tmp_path, tmp_path / "mr.dcm")
    late["occurred_at"] = "2005-06-01T10:00:00Z"
    _dead(n, _record(late), "dicom", "StudyDate")


BROKEN = ["no_meta.dcm", "no_meta_group_length.dcm", "MR_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_dicom_files_are_dead_lettered(tmp_path: Path, name: str) -> None:
    found = local_dicom_testdata(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    shutil.copy(found[0], tmp_path / name)
    _dead(_normalizer(tmp_path), _record(_dicom_event(tmp_path, tmp_path / name, modality="MR")), "dicom")


@pytest.mark.parametrize("cut", [0, 132, 600])
def test_empty_and_truncated_dicom_files_are_dead_lettered(tmp_path: Path, cut: int) -> None:
    data = dicom_file("MR_small.dcm").read_bytes()[:cut]
    (tmp_path / "cut.dcm").write_bytes(data)
    event = _dicom_event(tmp_path, tmp_path / "cut.dcm", modality="MR")
    _dead(_normalizer(tmp_path), _record(event), "dicom")


def test_anatomy_claim_check_travels_verified_to_the_decoder(cohort: Path, cohort_events: list[dict]) -> None:
    """A study's tissue map (the anatomy a twin starts from) is resolved, hash-checked and
    published, so the worker can load it by claim check; a tampered one is dead-lettered."""
    event = next(e for e in cohort_events if e["kind"] == "imaging")
    claim = event["body"]["measures"]["tissue_map_uri"]
    outcome = _one(_normalizer(cohort), _record(event))
    assert isinstance(outcome, Observation)
    decoded = decode_jsonld(outcome.value)
    assert decoded.tissue_map is not None
    assert (decoded.tissue_map.uri, decoded.tissue_map.sha256, decoded.tissue_map.size) == (claim["uri"], claim["sha256"], claim["size"])
    tampered = copy.deepcopy(event)
    tampered["event_id"] = str(uuid.uuid4())
    tampered["body"]["measures"]["tissue_map_uri"]["sha256"] = "0" * 64
    _dead(_normalizer(cohort), _record(tampered), "claim-check", "tissue_map_uri")
