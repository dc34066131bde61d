"""The cohort's events (bench.osse.cohort) and their downgrade to today's contract
(bench.osse.run.to_current_contract)."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import timedelta

import pytest
import torch

from bench.osse.cohort import CohortConfig, Sample, Treatment, envelope, generate_patient, patient_events, treatment_body
from bench.osse.run import EXTENSIONS, WITHHELD_CENSORED, ServicePath, to_current_contract
from bench.osse.truth import LABELS
from models.grid import Grid
from schemas import parse_time, validate

TINY = CohortConfig(grid=Grid((16, 16, 16), (4.0, 4.0, 4.0)), observe_days=150.0, score_margin_days=30.0,
                    presentation_core_ml=(3.0, 6.0), dt_days=1.0, horizons=(30.0,))


@pytest.fixture(scope="module")
def patient():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate_patient(0, 3, TINY)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def deliveries(patient, tmp_path_factory):
    root = tmp_path_factory.mktemp("osse-events")
    return root, patient_events(patient, root)


def test_full_events_carry_what_todays_contract_cannot(deliveries):
    _, ds = deliveries
    imaging = [d.event for d in ds if d.event["kind"] == "imaging"]
    treatments = [d.event["body"] for d in ds if d.event["kind"] == "treatment"]
    assert imaging and all(e["body"]["labels"] == LABELS for e in imaging)
    assert all({"regimen", "line_of_therapy"} <= set(b) for b in treatments)
    adjuvant = [b for b in treatments if b.get("regimen") == "stupp-adjuvant"]
    assert adjuvant and all(b["cycles_planned"] == 6 and b["cycle_length_days"] == 28 and 1 <= b["day_of_cycle"] <= 5
                            for b in adjuvant)


def test_every_event_fits_todays_contract_after_the_downgrade(deliveries):
    """Downgraded events validate, differ from the full ones only by the dropped fields, and
    every dropped fact is counted under its kind and field."""
    _, ds = deliveries
    for d in ds:
        event, dropped = to_current_contract(d.event)
        if event is None:
            assert dropped == {WITHHELD_CENSORED: 1} and "comparator" in d.event["body"]
            continue
        assert validate(event) == []
        fields = {key.split(".", 1)[1] for key in dropped}
        assert fields <= set(EXTENSIONS[d.event["kind"]]) and all(dropped[k] == 1 for k in dropped)
        assert {k: v for k, v in d.event["body"].items() if k not in fields} == event["body"]
        assert {k: v for k, v in d.event.items() if k != "body"} == {k: v for k, v in event.items() if k != "body"}


def test_a_censored_result_is_never_sent_as_a_measurement(patient):
    body = {"measure": "tumor_fraction", "value": patient.config.ctdna_lod, "unit": "1", "comparator": "<"}
    event = envelope("ctdna", patient, 30.5, patient.at(33.5), body, "5b0c7f0e-1d2a-5c3b-8e4f-6a7b8c9d0e1f")
    out, dropped = to_current_contract(event)
    if out is None:
        assert dropped == {WITHHELD_CENSORED: 1}
    else:  # a contract that carries the comparator gets it
        assert out["body"]["comparator"] == "<" and validate(out) == [] and not dropped


def test_a_dose_in_mg_per_kg_is_never_converted(patient):
    dose = Treatment("chemotherapy", 200.4, 10.0, "mg/kg", "bevacizumab", 2, drug="bevacizumab", cycle=3,
                     cycles_planned=12, day_of_cycle=1, cycle_length_days=14)
    body = treatment_body(patient, dose)
    assert body["drug"] == {"name": "bevacizumab", "rxnorm": "253337"} and body["body_weight_kg"] > 0
    event = envelope("treatment", patient, dose.t, patient.at(dose.t + 0.1), body, "7c1d8e2f-3a4b-5c6d-9e0f-1a2b3c4d5e6f")
    out, dropped = to_current_contract(event)
    assert validate(out) == [] and out["body"]["dose"] == {"value": 10.0, "unit": "mg/kg"}
    assert ("body_weight_kg" in out["body"]) != (dropped["treatment.body_weight_kg"] == 1)


def test_late_and_duplicated_deliveries(patient, tmp_path):
    """Deliveries come in delivery order; a duplicate is the same event, byte for byte, later;
    a late one is recorded days after it occurred."""
    noisy = replace(patient, config=replace(patient.config, late_probability=0.5, duplicate_probability=0.5))
    ds = patient_events(noisy, tmp_path)
    assert [d.delivered_at for d in ds] == sorted(d.delivered_at for d in ds)
    first = {}
    for d in ds:
        if d.duplicate:
            assert d.event == first[d.event["event_id"]].event and d.delivered_at > first[d.event["event_id"]].delivered_at
        else:
            assert d.event["event_id"] not in first
            first[d.event["event_id"]] = d
    late = [d for d in first.values()
            if parse_time(d.event["recorded_at"]) - parse_time(d.event["occurred_at"]) >= timedelta(days=2)]
    assert 0.2 * len(first) < len(late) < 0.8 * len(first)
    assert sum(d.duplicate for d in ds) > 0.2 * len(first)


def test_the_normalizer_takes_every_downgraded_event(deliveries):
    """Through the service's normalizer and worker adaptation: no event is dead-lettered by the
    normalizer; a duplicate delivery is recognised; the worker reaches the engine with the rest."""
    root, ds = deliveries
    path = ServicePath(root)
    events = [e for e in (to_current_contract(d.event)[0] for d in ds) if e is not None]
    typed = path.deliver(events + [copy.deepcopy(events[0])])
    assert not [k for k in path.counts if k.startswith("dead letter, normalizer")]
    assert path.counts["duplicates dropped by the normalizer"] >= 1
    kinds = {type(o).__name__ for o in typed}
    assert {"ImagingObservation", "MarkerObservation", "CtdnaObservation", "TreatmentEvent"} <= kinds
    scans = [o for o in typed if type(o).__name__ == "ImagingObservation"]
    assert all(o.tissue is not None and o.density is not None and o.segmentation is not None for o in scans)
    assert len(scans) == sum(1 for d in ds if d.event["kind"] == "imaging" and not d.duplicate)


def test_samples_below_the_limit_are_censored(patient):
    lod = patient.config.ctdna_lod
    ct = [s for s in patient.samples if s.kind == "ctdna"]
    assert ct and all(isinstance(s, Sample) for s in ct)
    assert all((s.value == lod) == s.censored for s in ct) and all(s.value >= lod for s in ct)
