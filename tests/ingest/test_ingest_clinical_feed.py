"""Issue 15's acceptance, without a broker: a feed written as an independent producer would
write it (fields the contract does not name, versions spelled "1", lomustine and bevacizumab
in mg/kg with the body weight, ctDNA below the limit of detection, labelled segmentations with
a CSF tissue map, FHIR MedicationAdministrations and censored Observations) normalizes with no
dead letter, and every fact reaches the worker's typed observations."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from assimilation.observations import CtdnaObservation, ImagingObservation, MarkerObservation, TreatmentEvent
from schemas import example
from stream.adapt import AdaptConfig, AdaptError, adapt, decode_record
from stream.deadletter import DeadLetter
from stream.normalizer import Normalizer, NormalizerSettings, Observation, SourceRecord
from stream.rdfstore import RdfStore
from stream.topics import Topics
from stream.volumes import claim_check, write_nifti

TOPICS = Topics("feed")
NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
FEED_NS = uuid.UUID("6f3d1c2a-9b8e-4d7f-a6c5-b4e3d2c1f0a9")
GRID = (12, 12, 12)
SPACING = [2.0, 2.0, 2.0]


def _normalizer(root: Path | None) -> Normalizer:
    return Normalizer(NormalizerSettings(imaging_root=root), TOPICS, clock=lambda: NOW)


def _records(documents: list[dict], kinds: list[str]) -> list[SourceRecord]:
    out = []
    for offset, (document, kind) in enumerate(zip(documents, kinds)):
        key = document.get("patient_id") or document["subject"]["reference"].split("/")[-1]
        out.append(SourceRecord(TOPICS.event_topic(kind), 0, offset, key, json.dumps(document).encode()))
    return out


# -- the feed -------------------------------------------------------------------------------


class Feed:
    """A producer's own events for a few patients: what a pharmacy, a lab, an RT system and an
    imaging pipeline send, named as the contract names its fields, plus their own extras."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.events: list[dict] = []
        self.kinds: list[str] = []
        self.start = datetime(2025, 1, 6, 9, 0, tzinfo=timezone(timedelta(hours=1)))
        self.rng = np.random.default_rng(7)

    def add(self, kind: str, patient: str, day: float, body: dict, version: str = "1", **extra: object) -> dict:
        when = self.start + timedelta(days=day)
        event = {
            "event_id": str(uuid.uuid5(FEED_NS, f"{patient}/{kind}/{len(self.events)}")),
            "patient_id": patient, "kind": kind,
            "occurred_at": when.isoformat(), "recorded_at": (when + timedelta(hours=3)).isoformat(),
            "source": f"{kind}-system", "schema_version": version, "body": body, **extra,
        }
        self.events.append(event)
        self.kinds.append(kind)
        return event

    def fhir(self, resource: dict, kind: str) -> dict:
        self.events.append(resource)
        self.kinds.append(kind)
        return resource

    def volumes(self, patient: str, day: int, labels: tuple[int, ...]) -> tuple[dict, dict]:
        """A label map (a core of the first label, rings of the others) and a tissue map with
        ventricles (label 3), as NIfTI files under the root; their claim checks."""
        z, y, x = np.indices(GRID)
        r = np.sqrt((x - 6) ** 2 + (y - 6) ** 2 + (z - 6) ** 2)
        segmentation = np.zeros(GRID, dtype=np.uint8)
        for radius, label in zip((1.5, 2.5, 3.5), labels):
            segmentation[(r <= radius) & (segmentation == 0)] = label
        tissue = np.full(GRID, 2, dtype=np.uint8)
        tissue[:, :, :2] = 1
        tissue[0] = tissue[-1] = 0
        tissue[2:4, 2:4, 2:4] = 3  # a ventricle, away from the tumour
        seg_path = self.root / patient / f"day{day}" / "seg.nii.gz"
        tissue_path = self.root / patient / "anatomy.nii.gz"
        write_nifti(seg_path, segmentation, tuple(SPACING))
        write_nifti(tissue_path, tissue, tuple(SPACING))
        return (claim_check(seg_path, self.root, format="nifti", content="segmentation"),
                claim_check(tissue_path, self.root, format="nifti", content="tissue"))


def _build_feed(root: Path) -> Feed:
    feed = Feed(root)
    for index, patient in enumerate(["GBM-0001", "GBM-0002"]):
        seg, tissue = feed.volumes(patient, 0, (1, 2, 4))
        feed.add("imaging", patient, 0, {
            "modality": "MR", "study_uid": f"2.25.{1000 + index}", "series_uid": f"2.25.{2000 + index}",
            "series_description": "AX T1 post-contrast", "voxel_spacing_mm": SPACING,
            "segmentation_uri": seg, "measures": {"tissue_map_uri": tissue},
        })
        # A follow-up segmented upstream from the whole study (no series), BraTS 2023 labels.
        seg2, _ = feed.volumes(patient, 60, (1, 2, 3))
        feed.add("imaging", patient, 60, {
            "modality": "MR", "study_uid": f"2.25.{3000 + index}", "voxel_spacing_mm": SPACING,
            "segmentation_uri": seg2, "segmentation_labels": {"1": "necrosis", "2": "edema", "3": "enhancing"},
            "measures": {"tissue_map_uri": tissue}, "pipeline": {"name": "nnU-Net", "fold": 3},
        }, version="1.1")
        for fraction in range(1, 4):
            feed.add("treatment", patient, fraction, {
                "type": "radiotherapy", "dose": {"value": 200, "unit": "cGy"}, "fraction_number": fraction,
                "fractions_planned": 30, "regimen": "Stupp", "line_of_therapy": 1, "phase": "concurrent",
            })
            feed.add("treatment", patient, fraction, {
                "type": "chemotherapy", "drug": {"name": "temozolomide", "rxnorm": "37776"},
                "dose": {"value": 75, "unit": "mg/m2"}, "route": "oral", "regimen": "Stupp",
                "cycle": 1, "day_of_cycle": fraction, "cycle_length_days": 42, "line_of_therapy": 1,
            }, ordering_provider_role="neuro-oncology")
        # Recurrence: lomustine (mg/kg) and bevacizumab (mg/kg) with the body weight.
        feed.add("treatment", patient, 120, {
            "type": "chemotherapy", "drug": {"name": "lomustine", "code": "6466", "system": "rxnorm", "display": "Lomustine"},
            "dose": {"value": 1.5, "unit": "mg/kg"}, "body_weight_kg": 80, "body_surface_area_m2": 2.0,
            "regimen": "lomustine + bevacizumab", "line_of_therapy": 2, "cycle": 1, "cycles_planned": 6,
            "cycle_length_days": 42,
        })
        feed.add("treatment", patient, 120, {
            "type": "chemotherapy", "drug": {"name": "bevacizumab", "rxnorm": "253337"},
            "dose": {"value": 10, "unit": "mg/kg"}, "body_weight_kg": 80, "route": "intravenous",
            "regimen": "lomustine + bevacizumab", "line_of_therapy": 2, "cycle": 1, "day_of_cycle": 1,
            "cycle_length_days": 14,
        })
        for visit in range(4):
            feed.add("lab", patient, 14 * visit, {
                "code": "2532-0", "value": float(200 + 40 * visit), "unit": "U/L", "display": "LDH", "flag": "N",
            })
            if visit % 2:
                ctdna = {"measure": "tumor_fraction", "below_lod": True, "lod": 0.001, "unit": "1", "assay": "sWGS"}
            else:
                ctdna = {"measure": "tumor_fraction", "value": 0.02 + 0.01 * visit, "unit": "1", "lod": 0.001}
            feed.add("ctdna", patient, 14 * visit, ctdna, version="1.0", panel="ichorCNA v0.2")
    # FHIR from the same clinic: a MedicationAdministration (mg, no body size) and a censored PSA.
    feed.fhir({
        "resourceType": "MedicationAdministration", "id": "ccnu-gbm0001-c2", "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6466"}],
                                      "text": "lomustine"},
        "subject": {"reference": "Patient/GBM-0001"}, "effectiveDateTime": "2025-06-16T10:00:00+02:00",
        "dosage": {"route": {"text": "oral"}, "dose": {"value": 200, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}},
    }, "treatment")
    feed.fhir({
        "resourceType": "Observation", "id": "ldh-gbm0002-x", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
        "subject": {"reference": "Patient/GBM-0002"}, "effectiveDateTime": "2025-02-01T08:00:00Z",
        "valueQuantity": {"comparator": "<", "value": 0.05, "unit": "ng/mL", "system": "http://unitsofmeasure.org", "code": "ng/mL"},
    }, "lab")
    return feed


@pytest.fixture(scope="module")
def normalized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Feed, list[Observation]]:
    feed = _build_feed(tmp_path_factory.mktemp("feed"))
    result = _normalizer(feed.root).process(_records(feed.events, feed.kinds))
    assert result.dead_letters == [], [(d.stage, d.reason) for d in result.dead_letters]
    assert result.duplicates == []
    assert len(result.observations) == len(feed.events)
    return feed, result.observations


def _typed(feed: Feed, observations: list[Observation]) -> dict[str, object]:
    config = AdaptConfig(feed.root, anatomy_fallback=None)
    return {o.event_id: adapt(decode_record(o.value), config, o.value) for o in observations}


# -- the acceptance ---------------------------------------------------------------------------


def test_the_feed_normalizes_without_a_dead_letter_and_every_event_becomes_a_typed_observation(normalized) -> None:
    feed, observations = normalized
    typed = _typed(feed, observations)
    kinds = {type(o) for o in typed.values()}
    assert kinds == {ImagingObservation, MarkerObservation, CtdnaObservation, TreatmentEvent}
    for event in feed.events:
        if "event_id" in event:
            assert typed[event["event_id"]].recorded_at == datetime.fromisoformat(event["recorded_at"])


def test_treatments_carry_drug_dose_body_size_and_course(normalized) -> None:
    feed, observations = normalized
    typed = [o for o in _typed(feed, observations).values() if isinstance(o, TreatmentEvent)]
    lomustine = next(t for t in typed if t.drug == "lomustine" and t.reported_unit == "mg/kg")
    assert (lomustine.drug_code, lomustine.drug_system) == ("6466", "rxnorm")
    assert (lomustine.unit, lomustine.dose) == ("mg/m2", pytest.approx(1.5 * 80 / 2.0))
    assert (lomustine.reported_dose, lomustine.total_dose_mg) == (1.5, pytest.approx(120.0))
    assert (lomustine.cycle, lomustine.cycles_planned, lomustine.cycle_length_days, lomustine.line_of_therapy) == (1, 6, 42.0, 2)
    assert lomustine.regimen == "lomustine + bevacizumab" and lomustine.dose_mg_per_m2 == lomustine.dose
    # Bevacizumab with a weight but no surface area: the dose stays in mg/kg and says so.
    bevacizumab = next(t for t in typed if t.drug == "bevacizumab")
    assert (bevacizumab.dose, bevacizumab.unit, bevacizumab.total_dose_mg) == (10.0, "mg/kg", 800.0)
    assert bevacizumab.dose_mg_per_m2 is None and bevacizumab.body_surface_area_m2 is None
    assert (bevacizumab.drug_code, bevacizumab.route, bevacizumab.cycle_length_days) == ("253337", "intravenous", 14.0)
    # The FHIR administration: a flat dose in mg, coded in RxNorm.
    fhir = next(t for t in typed if t.unit == "mg")
    assert (fhir.dose, fhir.drug, fhir.drug_code, fhir.route) == (200.0, "lomustine", "6466", "oral")
    radiotherapy = [t for t in typed if t.kind == "radiotherapy"]
    assert {(t.dose, t.unit, t.reported_dose, t.reported_unit) for t in radiotherapy} == {(2.0, "Gy", 200.0, "cGy")}
    assert sorted(t.fraction_number for t in radiotherapy) == [1, 1, 2, 2, 3, 3]
    assert {(t.fractions_planned, t.regimen, t.line_of_therapy) for t in radiotherapy} == {(30, "Stupp", 1)}
    temozolomide = [t for t in typed if t.drug == "temozolomide"]
    assert {(t.dose, t.unit, t.drug_code, t.cycle_length_days) for t in temozolomide} == {(75.0, "mg/m2", "37776", 42.0)}


def test_censored_results_are_results(normalized) -> None:
    feed, observations = normalized
    typed = _typed(feed, observations).values()
    ctdna = [o for o in typed if isinstance(o, CtdnaObservation)]
    below = [o for o in ctdna if o.comparator is not None]
    assert len(below) == 4 and len(ctdna) == 8
    assert {(o.comparator, o.limit, o.tumor_fraction, o.below_lod, o.detection_limit) for o in below} == {("<", 0.001, 0.001, True, 0.001)}
    assert all(o.detection_limit == 0.001 and not o.below_lod for o in ctdna if o.comparator is None)
    psa = next(o for o in typed if isinstance(o, MarkerObservation) and o.code == "2857-1")
    assert (psa.comparator, psa.limit, psa.value, psa.unit) == ("<", 0.05, 0.05, "ng/mL")


def test_labelled_segmentations_and_the_csf_tissue_map_reach_the_study(normalized) -> None:
    feed, observations = normalized
    studies = [o for o in _typed(feed, observations).values() if isinstance(o, ImagingObservation)]
    assert len(studies) == 4
    for study in studies:
        labels = np.asarray(study.labels)
        # Today's meaning holds: the segmentation is the visible tumour, every tumour label.
        assert np.array_equal(np.asarray(study.segmentation) > 0, labels > 0)
        whole = study.label_mask("necrosis", "edema", "enhancing")
        enhancing, necrosis = study.label_mask("enhancing"), study.label_mask("necrosis")
        assert np.array_equal(whole, labels > 0) and enhancing.any() and necrosis.any()
        assert not (enhancing & necrosis).any()
        # CSF is outside (no tumour, no flux): 0 in the tissue labels, kept as its own mask.
        assert set(np.unique(np.asarray(study.tissue))) == {0, 1, 2}
        assert study.csf is not None and int(np.asarray(study.csf).sum()) == 8
        assert not np.asarray(study.tissue)[np.asarray(study.csf)].any()
    conventions = sorted((s.label_convention, tuple(sorted(s.label_meanings.items()))) for s in studies)
    assert conventions[0] == ("brats", ((0, "background"), (1, "necrosis"), (2, "edema"), (4, "enhancing")))
    assert conventions[-1] == ("explicit", ((0, "background"), (1, "necrosis"), (2, "edema"), (3, "enhancing")))


def test_extensions_are_in_the_rdf_store_and_answer_sparql(normalized) -> None:
    feed, observations = normalized
    store = RdfStore(None)
    assert store.add_graphs([o.graph for o in observations]) == len(observations)
    rows = store.select(
        "SELECT ?event ?field ?value WHERE { ?r prov:wasDerivedFrom ?event ; ot:extension ?x . "
        "?x ot:field ?field ; ot:jsonValue ?value } ORDER BY ?event ?field"
    )
    found = {(r["event"].removeprefix("urn:uuid:"), r["field"]): json.loads(r["value"]) for r in rows}
    for event in feed.events:
        if "event_id" not in event:
            continue
        extras = {k: v for k, v in event.items() if k not in example("lab")}
        extras.update({f"body.{k}": v for k, v in event["body"].items() if k in _UNNAMED})
        for field, value in extras.items():
            assert found[event["event_id"], field] == value
    assert found and all(field in {*_UNNAMED_PATHS, "panel", "ordering_provider_role"} for _, field in found)


_UNNAMED = {"series_description", "pipeline", "phase", "display", "flag"}
_UNNAMED_PATHS = {f"body.{name}" for name in _UNNAMED}


def test_events_of_the_contract_before_it_opened_still_normalize(cohort: Path, cohort_events: list[dict]) -> None:
    """The virtual cohort's events use only fields the contract named before issue 15, and
    the base examples are as first published (schema_version 1.0): all normalize as before,
    with no extension."""
    events = [*cohort_events, *(example(kind) for kind in ("lab", "ctdna", "treatment"))]
    result = _normalizer(cohort).process(_records(events, [e["kind"] for e in events]))
    assert result.dead_letters == [] and len(result.observations) == len(events)
    for observation in result.observations:
        assert decode_record(observation.value).extensions == ()


# -- what is still refused, with a reason -------------------------------------------------------


def test_a_label_the_mapping_does_not_list_is_refused(tmp_path: Path) -> None:
    feed = Feed(tmp_path)
    seg, tissue = feed.volumes("GBM-0003", 0, (1, 2, 5))
    feed.add("imaging", "GBM-0003", 0, {
        "modality": "MR", "study_uid": "2.25.9", "voxel_spacing_mm": SPACING, "segmentation_uri": seg,
        "segmentation_labels": {"1": "necrosis", "2": "edema", "4": "enhancing"}, "measures": {"tissue_map_uri": tissue},
    })
    # Several tumour labels outside the BraTS convention and no mapping: refused too.
    seg2, _ = feed.volumes("GBM-0003", 1, (1, 6, 7))
    feed.add("imaging", "GBM-0003", 1, {"modality": "MR", "study_uid": "2.25.10", "voxel_spacing_mm": SPACING, "segmentation_uri": seg2})
    result = _normalizer(tmp_path).process(_records(feed.events, feed.kinds))
    first, second = sorted(result.dead_letters, key=lambda d: d.offset)
    assert (first.stage, second.stage) == ("nifti", "nifti") and not result.observations
    assert first.reason.startswith("body.segmentation_labels: ") and "[5]" in first.reason
    assert second.reason.startswith("body.segmentation_uri: ") and "segmentation_labels" in second.reason


def test_a_tissue_label_beyond_csf_is_refused_by_the_worker_with_its_labels(tmp_path: Path) -> None:
    feed = Feed(tmp_path)
    seg, tissue = feed.volumes("GBM-0004", 0, (1, 2, 4))
    path = tmp_path / tissue["uri"]
    from stream.volumes import read_nifti  # noqa: PLC0415

    labels, spacing = read_nifti(path)
    labels = np.asarray(labels).copy()
    labels[5, 5, 0] = 7
    write_nifti(path, labels, spacing)
    tissue = claim_check(path, tmp_path, format="nifti", content="tissue")
    feed.add("imaging", "GBM-0004", 0, {"modality": "MR", "study_uid": "2.25.11", "voxel_spacing_mm": SPACING,
                                        "segmentation_uri": seg, "measures": {"tissue_map_uri": tissue}})
    (observation,) = _normalizer(tmp_path).process(_records(feed.events, feed.kinds)).observations
    with pytest.raises(AdaptError) as caught:
        adapt(decode_record(observation.value), AdaptConfig(tmp_path, anatomy_fallback=None), observation.value)
    assert caught.value.stage == "nifti" and "3 (CSF, ventricles)" in caught.value.reason and "7" in caught.value.reason


@pytest.mark.parametrize(
    ("resource", "field"),
    [
        ({"status": "not-done"}, "MedicationAdministration.status"),
        ({"dosage": {"dose": {"value": 20, "unit": "U", "system": "http://unitsofmeasure.org", "code": "U"}}}, "body.dose.unit"),
        ({"medicationCodeableConcept": None, "medicationReference": {"reference": "Medication/elsewhere"}},
         "MedicationAdministration.medication[x]"),
        ({"subject": {"reference": "Patient/123 45"}}, "MedicationAdministration.subject.reference"),
    ],
)
def test_a_medication_administration_that_cannot_be_an_event_says_why(resource: dict, field: str) -> None:
    base = example("treatment.fhir-medication-administration")
    base.update(resource)
    base = {k: v for k, v in base.items() if v is not None}
    (dead,) = _normalizer(None).process(_records([base], ["treatment"])).dead_letters
    assert isinstance(dead, DeadLetter) and dead.reason.startswith(field), dead.reason


def test_the_new_facts_survive_the_twins_journal(normalized) -> None:
    """Typed observations are journalled (assimilation.store) until their twin applies them:
    the fields added for the feed come back equal, label keys as integers."""
    from assimilation.store import decode_observation, encode_observation  # noqa: PLC0415

    feed, observations = normalized
    for typed in _typed(feed, observations).values():
        back = decode_observation(encode_observation(typed))
        if isinstance(typed, ImagingObservation):
            assert back.label_meanings == typed.label_meanings and all(isinstance(k, int) for k in back.label_meanings)
            assert np.array_equal(np.asarray(back.labels), np.asarray(typed.labels))
            assert np.array_equal(np.asarray(back.csf), np.asarray(typed.csf))
        else:
            assert back == typed


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"comparator": "<", "limit": None}, "value is its limit"),
        ({"comparator": "<", "limit": 0.2}, "value is its limit"),
        ({"comparator": "~", "limit": 0.1}, "comparator must be one of"),
        ({"comparator": None, "limit": 0.1}, "only with a comparator"),
    ],
)
def test_a_censored_typed_observation_holds_its_limit_as_its_value(fields: dict, words: str) -> None:
    common = {"event_id": "e", "patient_id": "GBM-0001", "time": NOW}
    assert CtdnaObservation(**common, tumor_fraction=0.1, comparator="<", limit=0.1).limit == 0.1
    with pytest.raises(ValueError, match=words):
        CtdnaObservation(**common, tumor_fraction=0.1, **fields)
    with pytest.raises(ValueError, match=words):
        MarkerObservation(**common, code="2857-1", value=0.1, unit="ng/mL", **fields)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_the_visible_tumour_of_a_label_map_is_the_union_of_its_tumour_labels(data) -> None:
    """Whatever the labels of a map (BraTS, one label, or a mapping the event gives), the
    segmentation is the voxels of its tumour labels: with the default conventions every
    positive label, as a 0/1 mask always was; resection cavity and background never."""
    from stream.imaging import FileCheckError, segmentation_labels  # noqa: PLC0415

    values = data.draw(st.lists(st.integers(0, 6), min_size=8, max_size=8))
    labels = np.array(values, dtype=np.int16).reshape(2, 2, 2)
    explicit = data.draw(st.none() | st.dictionaries(st.integers(0, 6), st.sampled_from(
        ["tumor", "necrosis", "edema", "enhancing", "resection_cavity", "background"]), min_size=1))
    positive = set(values) - {0}
    try:
        mask, meanings, convention = segmentation_labels(labels, explicit)
    except FileCheckError as exc:
        if explicit:
            assert positive - set(explicit), "refused a map whose labels were all listed"
            assert exc.field == "body.segmentation_labels"
        else:
            assert len(positive) > 1 and not positive <= {1, 2, 3, 4}
        return
    meaning = dict(meanings)
    assert set(values) <= set(meaning)
    tumour = {label for label, m in meaning.items() if m in ("tumor", "necrosis", "edema", "enhancing")}
    assert np.array_equal(mask, np.isin(labels, sorted(tumour)))
    if explicit is None:
        assert np.array_equal(mask, labels > 0) and convention in ("binary", "brats")
    else:
        assert convention == "explicit" and all(meaning[k] == v for k, v in explicit.items())


def test_a_soft_mask_is_read_from_one_half_and_has_no_labels() -> None:
    from stream.imaging import FileCheckError, segmentation_labels  # noqa: PLC0415

    soft = np.array([0.0, 0.2, 0.5, 0.9, 1.0, 0.49, 0.51, 0.0], dtype=np.float32).reshape(2, 2, 2)
    mask, meanings, convention = segmentation_labels(soft, None)
    assert np.array_equal(mask, soft >= 0.5) and meanings is None and convention == "soft"
    with pytest.raises(FileCheckError, match="soft mask"):
        segmentation_labels(soft, {1: "tumor"})


def test_a_new_extension_field_is_logged_once_by_its_path_never_its_value(caplog: pytest.LogCaptureFixture) -> None:
    events = []
    for n in range(3):
        event = example("lab.extensions")
        event["event_id"] = str(uuid.uuid5(FEED_NS, f"log/{n}"))
        event["body"]["ordering_clinician"] = "Dr. Secret 4711"
        events.append(event)
    normalizer = _normalizer(None)
    with caplog.at_level("INFO", logger="stream.normalizer"):
        result = normalizer.process(_records(events, ["lab"] * 3))
        normalizer.process(_records(events[:1], ["lab"]))
    assert len(result.observations) == 3
    text = caplog.text
    assert text.count("'body.ordering_clinician' first seen") == 1
    assert "Secret" not in text and "4711" not in text and "VP-0001" not in text and "312" not in text
