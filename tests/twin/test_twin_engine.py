"""The engine end to end on a virtual patient: determinism, late events, duplicates, pending
observations, and the snapshots it leaves behind."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import torch

from assimilation.engine import Engine, EngineConfig
from assimilation.observations import ImagingObservation, MarkerObservation, TreatmentEvent
from assimilation.store import MemoryBackend, RetentionPolicy, StateStore

CONFIG = EngineConfig(n_members=16)


def _engine(tmp_path=None, retention: RetentionPolicy | None = None) -> Engine:
    store = StateStore(f"file://{tmp_path}" if tmp_path else MemoryBackend(), retention=retention)
    return Engine(store, CONFIG)


def _assert_same_forecast(a, b, atol=0.0):
    assert (a.patient_id, a.issued_for, a.scenarios, a.horizons_days) == (b.patient_id, b.issued_for, b.scenarios,
                                                                          b.horizons_days)
    for q in ("volume_ml", "burden_ml", "marker", "ctdna_fraction", "prob_visible"):
        assert torch.allclose(getattr(a, q), getattr(b, q), rtol=0.0, atol=atol), q


def _assert_same_twin(a, b, atol=0.0):
    assert a.clock == b.clock and set(a.applied) == set(b.applied) and a.treatments == b.treatments
    assert torch.allclose(a.u, b.u, rtol=0.0, atol=atol)
    assert torch.allclose(a.log_params, b.log_params, rtol=0.0, atol=atol)


def test_same_observations_from_an_empty_store_give_identical_forecasts(tmp_path, events, patient):
    first = _engine(tmp_path / "a").process(events)
    second = _engine(tmp_path / "b").process(events)
    assert len(first) == len(second) == 1
    _assert_same_forecast(first[0], second[0])
    fc = first[0]
    assert fc.patient_id == patient.pseudonym and set(fc.based_on_events) == {o.event_id for o in events}
    assert fc.issued_for == max(o.time for o in events if not isinstance(o, TreatmentEvent))


def test_a_late_observation_gives_the_in_order_result(events, patient):
    in_order = _engine()
    expected = in_order.process(events)[0]
    twin_expected = in_order.store.latest(patient.pseudonym)

    # The second study (day ~43) arrives after everything up to day 200 was processed, with
    # snapshots retained: it is re-analysed from the newest snapshot before it.
    studies = [o for o in events if isinstance(o, ImagingObservation)]
    held = studies[1]
    engine = _engine(retention=RetentionPolicy(keep_last=None, keep_days=None))
    engine.process([o for o in events if o is not held])
    result = engine.process_batch([held])
    report = result.reports[patient.pseudonym]
    # everything after the snapshot was re-applied in time order, the late study among them
    assert held.event_id in report.applied and len(report.applied) > 10
    replayed = {o.event_id: o.time for o in events if o.event_id in report.applied}
    assert [replayed[i] for i in report.applied] == sorted(replayed.values())
    assert report.replayed_from is not None and 0.0 < report.replayed_from < twin_expected.days(held.time)
    _assert_same_forecast(result.forecasts[0], expected, atol=1e-5)
    _assert_same_twin(engine.store.latest(patient.pseudonym), twin_expected, atol=1e-5)


def test_late_events_older_than_every_snapshot_rebuild_from_the_first_study(events, patient):
    expected = _engine().process(events)[0]
    # Keep one snapshot only; a lab from day ~6 and a radiotherapy fraction arrive last.
    engine = _engine(retention=RetentionPolicy(keep_last=1, keep_days=None))
    lab = next(o for o in events if isinstance(o, MarkerObservation))
    rt = next(o for o in events if isinstance(o, TreatmentEvent))
    engine.process([o for o in events if o not in (lab, rt)])
    assert len(engine.store.snapshots(patient.pseudonym)) == 1
    result = engine.process_batch([rt, lab])
    assert result.reports[patient.pseudonym].replayed_from == float("-inf")
    _assert_same_forecast(result.forecasts[0], expected, atol=1e-5)


def test_duplicates_are_skipped_and_give_no_forecast(events, patient):
    engine = _engine()
    engine.process(events[:20])
    twin = engine.store.latest(patient.pseudonym)
    result = engine.process_batch(events[:20])
    assert result.forecasts == []
    assert set(result.reports[patient.pseudonym].skipped) == {o.event_id for o in events[:20]}
    again = engine.store.latest(patient.pseudonym)
    assert torch.equal(again.u, twin.u) and again.applied == twin.applied


def test_observations_before_the_first_study_wait_in_the_store(events, patient):
    # The feed delivers the labs and treatments of the first weeks before the first study.
    studies = [o for o in events if isinstance(o, ImagingObservation)]
    first = studies[0]
    early = [o for o in events if o.time < studies[1].time and o is not first]
    engine = _engine()
    result = engine.process_batch(early)
    assert result.forecasts == [] and engine.store.latest(patient.pseudonym) is None
    assert set(result.reports[patient.pseudonym].pending) == {o.event_id for o in early}
    assert {o.event_id for o in engine.store.pending(patient.pseudonym)} == {o.event_id for o in early}
    result = engine.process_batch([first])
    assert len(result.forecasts) == 1 and engine.store.pending(patient.pseudonym) == []
    # same twin as when everything arrives in order
    reference = _engine()
    reference.process(early + [first])
    _assert_same_twin(engine.store.latest(patient.pseudonym), reference.store.latest(patient.pseudonym))


def test_one_forecast_per_updated_patient(patients):
    from twin_support import typed_observations

    engine = _engine()
    batch = [o for p in patients[:2] for o in typed_observations(p, until=60.0)]
    forecasts = engine.process(batch)
    assert [f.patient_id for f in forecasts] == sorted(p.pseudonym for p in patients[:2])
    # the snapshots of both patients are there, one per analysis time
    for p in patients[:2]:
        twin = engine.store.latest(p.pseudonym)
        assert twin.n_analyses >= 3 and twin.clock <= 60.0 + 1
        assert engine.store.snapshots(p.pseudonym)[-1][0] == twin.clock


def test_batching_patients_forecasts_them_as_one_at_a_time(patients):
    from twin_support import typed_observations

    batch = [o for p in patients for o in typed_observations(p, until=80.0)]
    alone = _engine().process(batch)
    together = Engine(StateStore(MemoryBackend()), replace(CONFIG, batch_patients=True)).process(batch)
    assert [f.patient_id for f in together] == [f.patient_id for f in alone] and len(alone) == 3
    for a, b in zip(alone, together):
        # the same members and clocks; only the solver's shared stopping rule differs
        assert torch.allclose(a.burden_ml, b.burden_ml, rtol=1e-4, atol=1e-5)
        assert torch.allclose(a.marker, b.marker, rtol=1e-4)
        assert (a.volume_ml - b.volume_ml).abs().max() <= 0.25  # at most a couple of voxels


def test_presentation_only_for_a_first_study_no_delivered_treatment_precedes():
    # A presenting tumour on a small grid; the engine's twin config asks for presentation.
    from assimilation.experiment import PRESENTING_COHORT, PRESENTING_TWIN
    from assimilation.twin import init_twin
    from models.grid import Grid
    from models.virtual_patient import generate_patient
    from twin_support import typed_observations

    cohort = replace(PRESENTING_COHORT, grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=60.0,
                     truth_margin_days=1.0)
    p = generate_patient(0, 7, cohort)
    events = typed_observations(p)
    first = next(o for o in events if isinstance(o, ImagingObservation))
    rt = next(o for o in events if isinstance(o, TreatmentEvent) and not o.planned)
    config = EngineConfig(n_members=8, twin=PRESENTING_TWIN)
    presented = init_twin(p.pseudonym, first, 8, config=PRESENTING_TWIN)
    plain = init_twin(p.pseudonym, first, 8, config=replace(PRESENTING_TWIN, presentation=False))
    assert not torch.equal(presented.log_params, plain.log_params)

    diagnostic = Engine(StateStore(MemoryBackend()), config)
    diagnostic.process([first])
    assert torch.equal(diagnostic.store.latest(p.pseudonym).log_params, presented.log_params)

    # The same study after a radiotherapy fraction: the tumour did not grow untreated to it.
    treated = Engine(StateStore(MemoryBackend()), config)
    earlier = replace(rt, time=first.time - timedelta(days=3))
    treated.process([earlier, first])
    twin = treated.store.latest(p.pseudonym)
    assert twin.origin_event_id == first.event_id and earlier.event_id in twin.applied
    start = treated.store.load(treated.store.snapshots(p.pseudonym)[0][1])
    assert torch.equal(start.log_params, plain.log_params)
