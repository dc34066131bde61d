"""The patient twin: its initial ensemble, propagation, analysis bounds and idempotence."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta

import pytest
import torch

from assimilation.filters.etkf import ETKF
from assimilation.observations import (
    CtdnaObservation,
    ImagingObservation,
    MarkerObservation,
    TreatmentEvent,
)
from assimilation.twin import (
    PARAM_NAMES,
    PatientTwin,
    advance,
    assimilate,
    effective_treatments,
    init_twin,
    log_bounds,
)
from models.observables import tumor_burden

N = 16


@pytest.fixture(scope="module")
def first(events) -> ImagingObservation:
    return next(o for o in events if isinstance(o, ImagingObservation))


@pytest.fixture(scope="module")
def twin0(first) -> PatientTwin:
    return init_twin(first.patient_id, first, N)


def _same(a: PatientTwin, b: PatientTwin) -> bool:
    return (torch.equal(a.u, b.u) and torch.equal(a.log_params, b.log_params) and a.clock == b.clock
            and a.applied == b.applied and a.treatments == b.treatments and a.n_analyses == b.n_analyses)


def test_initial_ensemble_matches_the_first_study(twin0, patient, first):
    u = twin0.u
    assert u.shape == (N, *patient.grid.shape) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0
    assert not bool(u[:, ~twin0.brain].any()), "no tumour outside the brain"
    # The denoised study keeps the true burden's order of magnitude (the raw map, with its
    # clamped noise everywhere, holds ~10 times too much).
    burden = tumor_burden(u, patient.grid.voxel_volume_ml)
    truth = float(patient.truth_burden_ml[0])
    assert 0.5 * truth < float(burden.median()) < 2.5 * truth
    assert float(burden.std()) > 0.05 * float(burden.mean()), "members differ"
    # Parameters: prior draws inside the prior's bounds, spread like the prior (log sd 0.3-0.4).
    lo, hi = log_bounds(twin0.prior)
    assert bool(((twin0.log_params >= lo) & (twin0.log_params <= hi)).all())
    sd = twin0.log_params.std(0)
    assert bool(((sd > 0.15) & (sd < 0.7)).all()), sd
    assert twin0.clock == 0.0 and twin0.epoch == first.time and twin0.applied == (first.event_id,)
    # Seeded by (patient, "prior") and (patient, "init", event id): the same twin every time.
    again = init_twin(first.patient_id, first, N)
    assert _same(again, twin0)
    other = init_twin("another-patient", replace(first, patient_id="another-patient"), N)
    assert not torch.equal(other.log_params, twin0.log_params)


def test_advance_grows_the_tumour_and_leaves_its_input_alone(twin0):
    u_before = twin0.u.clone()
    later = advance(twin0, 10.0)
    assert torch.equal(twin0.u, u_before) and twin0.clock == 0.0
    assert later.clock == 10.0
    b0 = tumor_burden(twin0.u, twin0.grid.voxel_volume_ml)
    b1 = tumor_burden(later.u, twin0.grid.voxel_volume_ml)
    # untreated logistic growth at rho ~ 0.05/day: about exp(0.5) in 10 days for a small tumour
    ratio = (b1 / b0).median()
    assert 1.2 < float(ratio) < 2.2
    assert advance(twin0, 0.0) is twin0
    with pytest.raises(ValueError):
        advance(later, 5.0)


def test_radiotherapy_fractions_apply_when_advancing_past_them(twin0, first):
    rt = [TreatmentEvent(event_id=f"rt-{k}", patient_id=first.patient_id, time=first.time + timedelta(days=1 + k),
                         kind="radiotherapy", dose=2.0, unit="Gy") for k in range(5)]
    treated, report = assimilate(twin0, rt, ETKF())
    assert report.applied == tuple(e.event_id for e in rt) and not report.analyses
    assert treated.clock == twin0.clock, "recording a treatment does not move the clock"
    a = advance(treated, 10.0)
    b = advance(twin0, 10.0)
    # 5 x 2 Gy with alpha ~ 0.05/Gy kills ~ 1 - exp(-5 * 0.11) ~ 40 %
    kill = 1 - tumor_burden(a.u, 0.125) / tumor_burden(b.u, 0.125)
    assert 0.2 < float(kill.median()) < 0.6


def test_assimilating_keeps_density_and_parameters_in_bounds(twin0, events):
    t, report = assimilate(twin0, events, ETKF())
    assert len(report.skipped) == 1, "the first study is the initial state"
    assert report.analyses and all(r.n_used == r.n_obs for r in report.analyses)
    assert float(t.u.min()) >= 0.0 and float(t.u.max()) <= 1.0 and not bool(t.u[:, ~t.brain].any())
    lo, hi = log_bounds(t.prior)
    assert bool(((t.log_params >= lo) & (t.log_params <= hi)).all())
    # RTPS keeps the parameters from collapsing over 15 analyses: the spread shrinks where the
    # data are informative (ctDNA shedding, rho: to about a third here) but never to nothing
    ratio = t.log_params.std(0) / twin0.log_params.std(0)
    assert bool((ratio > 0.2).all()) and bool((ratio < 1.2).all()), ratio
    # innovations are consistent with the noise model in the mean (~1)
    z = torch.tensor([r.normalized_innovation_rms for r in report.analyses])
    assert 0.4 < float(z.mean()) < 2.0
    assert t.clock == max(t.days(o.time) for o in events if not isinstance(o, TreatmentEvent))
    assert t.applied[0] == twin0.applied[0] and len(t.applied) == len(events)


def test_assimilation_is_idempotent_on_event_id(twin0, events):
    head = [o for o in events if o.time <= twin0.epoch + timedelta(days=60)]
    once, _ = assimilate(twin0, head, ETKF())
    twice, report = assimilate(once, head, ETKF())
    assert twice is once and len(report.skipped) == len(head) and not report.applied
    doubled, _ = assimilate(twin0, head + head, ETKF())
    assert _same(doubled, once)


def test_late_and_foreign_events_are_refused(twin0, events, first):
    lab = next(o for o in events if isinstance(o, MarkerObservation))
    moved, _ = assimilate(twin0, [lab], ETKF())
    early = CtdnaObservation(event_id="ct-early", patient_id=first.patient_id, time=lab.time - timedelta(days=1),
                             tumor_fraction=1e-3)
    with pytest.raises(ValueError, match="re-analysis"):
        assimilate(moved, [early], ETKF())
    same_time = replace(early, event_id="ct-same", time=lab.time)
    with pytest.raises(ValueError, match="re-analysis"):
        assimilate(moved, [same_time], ETKF())
    with pytest.raises(ValueError, match="belongs to"):
        assimilate(moved, [replace(lab, event_id="x", patient_id="someone-else")], ETKF())


def test_events_before_the_first_study_and_unknown_markers_are_recorded_not_analysed(twin0, first):
    before = MarkerObservation(event_id="old-lab", patient_id=first.patient_id, time=first.time - timedelta(days=3),
                               code="2532-0", value=250.0, unit="U/L")
    psa = MarkerObservation(event_id="psa", patient_id=first.patient_id, time=first.time + timedelta(days=3),
                            code="2857-1", value=4.0, unit="ng/mL")
    t, report = assimilate(twin0, [before, psa], ETKF())
    assert set(report.ignored) == {"old-lab", "psa"} and not report.analyses
    assert torch.equal(t.u, twin0.u) and torch.equal(t.log_params, twin0.log_params)
    assert t.has_applied("old-lab") and t.has_applied("psa")


def test_a_delivered_treatment_supersedes_the_planned_one(twin0, first):
    def ev(eid, days, planned):
        return TreatmentEvent(event_id=eid, patient_id=first.patient_id, time=first.time + timedelta(days=days),
                              kind="radiotherapy", dose=2.0, unit="Gy", planned=planned)

    t, _ = assimilate(twin0, [ev("plan-1", 5.0, True), ev("plan-2", 6.0, True), ev("given-1", 5.1, False)], ETKF())
    assert [r.event_id for r in effective_treatments(t.treatments)] == ["given-1", "plan-2"]


def test_parameter_names_follow_the_prior(twin0):
    assert PARAM_NAMES == ("D", "rho", "alpha", "k_chemo", "marker_shedding", "ctdna_shedding")
    medians = [math.log(getattr(twin0.prior, n).median) for n in PARAM_NAMES]
    # 16 draws: the ensemble mean of each log-parameter lies within ~3 standard errors of the median
    for k, m in enumerate(medians):
        sigma = getattr(twin0.prior, PARAM_NAMES[k]).sigma
        assert abs(float(twin0.log_params[:, k].mean()) - m) < 3 * sigma / math.sqrt(N)


def test_a_twin_runs_on_segmentations_alone(events, first):
    # A feed without cellularity maps: the twin starts from the mask and analyses later masks.
    studies = [replace(o, density=None) for o in events if isinstance(o, ImagingObservation)]
    twin = init_twin(first.patient_id, studies[0], 8)
    seg = torch.as_tensor(studies[0].segmentation).bool()
    # 0.5 on the mask (times each member's smooth factor), a sub-visible tail around it
    assert bool((twin.u[:, seg] > 0.1).all()) and float(twin.u[:, seg].median()) == pytest.approx(0.5, abs=0.1)
    assert float(twin.u[:, ~seg].sum()) < float(twin.u[:, seg].sum())
    twin, report = assimilate(twin, studies[1:3], ETKF())
    assert len(report.analyses) == 2 and all(r.n_used > 50 for r in report.analyses)
    assert float(twin.u.min()) >= 0.0 and float(twin.u.max()) <= 1.0


def test_presentation_learns_from_the_diagnostic_study_and_is_reproducible():
    # A presenting tumour (grown untreated to 5-15 mL) on a small grid: the presentation
    # analysis narrows the log-D spread, keeps the parameters in bounds and the field in [0, 1],
    # leaves the clock at the study, and gives the same twin twice.
    from assimilation.experiment import PRESENTING_COHORT, PRESENTING_TWIN
    from assimilation.twin import log_bounds
    from models.grid import Grid
    from models.virtual_patient import generate_patient
    from twin_support import typed_observations

    cohort = replace(PRESENTING_COHORT, grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=10.0,
                     truth_margin_days=1.0)
    p = generate_patient(0, 7, cohort)
    first = next(o for o in typed_observations(p) if isinstance(o, ImagingObservation))
    prior = init_twin(p.pseudonym, first, 8, config=replace(PRESENTING_TWIN, presentation=False))
    a = init_twin(p.pseudonym, first, 8, config=PRESENTING_TWIN)
    b = init_twin(p.pseudonym, first, 8, config=PRESENTING_TWIN)
    assert torch.equal(a.u, b.u) and torch.equal(a.log_params, b.log_params)
    assert a.clock == prior.clock and a.applied == prior.applied
    assert float(a.log_params[:, 0].std()) < 0.8 * float(prior.log_params[:, 0].std())
    lo, hi = log_bounds(a.prior)
    assert bool(((a.log_params >= lo) & (a.log_params <= hi)).all())
    assert float(a.u.min()) >= 0.0 and float(a.u.max()) <= 1.0
    assert float(a.u[:, ~a.brain].abs().sum()) == 0.0


def test_treatments_the_model_cannot_apply_are_recorded_not_simulated(twin0, first):
    # A bevacizumab infusion in mg/kg and an unknown drug in mg/m² must not act as temozolomide;
    # a temozolomide dose whose body size was not sent (mg) cannot be converted either.
    t = first.time + timedelta(days=1)
    common = dict(patient_id=first.patient_id, time=t, kind="chemotherapy")
    bev = TreatmentEvent(event_id="bev", dose=10.0, unit="mg/kg", drug="bevacizumab", drug_code="253337",
                         drug_system="rxnorm", **common)
    other = TreatmentEvent(event_id="x", dose=100.0, unit="mg/m2", drug="somedrug", **common)
    flat = TreatmentEvent(event_id="tmz-mg", dose=150.0, unit="mg", drug="temozolomide", drug_code="37776",
                          drug_system="rxnorm", **common)
    tmz = TreatmentEvent(event_id="tmz", dose=150.0, unit="mg/m2", drug="Temozolomide", **common)
    twin, report = assimilate(twin0, [bev, other, flat, tmz], ETKF())
    assert set(report.ignored) == {"bev", "x", "tmz-mg"}
    assert "no model for drug rxnorm:253337" in report.ignored["bev"]
    assert [r.event_id for r in twin.treatments] == ["tmz"]
    assert set(report.applied) == {"bev", "x", "tmz-mg", "tmz"}  # all recorded: redelivery skips them
