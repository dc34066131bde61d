"""The fraternal-twin truth (bench.osse.truth): each feature the twin lacks, checked by a property."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.osse import truth as T
from bench.osse.cohort import SECOND_LINES, CohortConfig, first_line, generate_patient, patient_events, second_line_of
from models.grid import Grid
from models.tissue import WHITE, synthetic_brain

SMALL = Grid((16, 16, 16), (3.0, 3.0, 3.0))
TINY_COHORT = CohortConfig(grid=Grid((16, 16, 16), (4.0, 4.0, 4.0)), observe_days=150.0, score_margin_days=30.0,
                           presentation_core_ml=(3.0, 6.0), dt_days=1.0, horizons=(30.0,))


@pytest.fixture(autouse=True)
def _one_thread():
    # small tensors on a shared 2-core machine: a descheduled second thread only waits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(**overrides) -> T.TruthParams:
    return replace(T.draw_params(torch.Generator().manual_seed(0)), **overrides)


@pytest.fixture(scope="module")
def anatomy() -> tuple[T.Anatomy, T.TruthParams]:
    g = torch.Generator().manual_seed(11)
    tissue = synthetic_brain(SMALL, g)
    p = _params(rho=0.05, D_white=0.2)
    return T.build_anatomy(SMALL, tissue, p, g), p


def _tumour(anatomy: T.Anatomy, p: T.TruthParams, days: float = 60.0) -> T.TruthState:
    state = T.seed_state(anatomy, p, torch.Generator().manual_seed(3), sd_mm=4.0, peak=0.9, margin_mm=6.0)
    return T.advance(state, days, anatomy, p, T.Regimen.empty(), dt=1.0)


@settings(max_examples=8, deadline=None)
@given(direction=st.tuples(*[st.floats(-1.0, 1.0)] * 3).filter(lambda v: sum(x * x for x in v) > 0.05),
       anisotropy=st.floats(2.0, 10.0))
def test_migration_spreads_along_fibres_as_the_tensor_says(direction, anisotropy):
    """In uniform white matter with one fibre direction f, a blob's covariance grows by
    2 D_par t along f and 2 D_perp t across it (within 2 %: the discretisation), whatever f."""
    grid = Grid((28, 28, 28), (1.0, 1.0, 1.0))
    tissue = torch.full(grid.shape, WHITE, dtype=torch.long)
    f = torch.tensor(direction, dtype=torch.float64)
    f = f / f.norm()
    p = _params(D_white=0.2, anisotropy=anisotropy)
    tensor = T.diffusion_tensor(tissue, f.expand(*grid.shape, 3).clone(), p)
    faces = T.face_coefficients(tensor)
    x = grid.coords(dtype=torch.float64)
    u = torch.exp(-0.5 * ((x - torch.tensor(grid.center_mm, dtype=torch.float64)) ** 2).sum(-1) / 2.5 ** 2)

    def cov(u):
        w = u / u.sum()
        d = x - (w[..., None] * x).sum((0, 1, 2))
        return torch.einsum("xyz,xyzi,xyzj->ij", w, d, d)

    before, days = cov(u), 6.0
    n = math.ceil(days / T.stable_substep(tensor, grid.spacing))
    for _ in range(n):
        u = T._flush(u + (days / n) * T.divergence(u, tensor, faces, grid.spacing))
    grown = cov(u) - before
    across = torch.linalg.eigh(torch.eye(3, dtype=torch.float64) - torch.outer(f, f)).eigenvectors[:, -1]
    d_perp = 3.0 * p.D_white / (anisotropy + 2.0)
    along_rate, across_rate = float(f @ grown @ f) / (2 * days), float(across @ grown @ across) / (2 * days)
    assert along_rate > across_rate
    assert along_rate == pytest.approx(anisotropy * d_perp, rel=0.02)
    assert across_rate == pytest.approx(d_perp, rel=0.02)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_migration_conserves_cells_and_never_leaves_the_tissue(anatomy, seed):
    an, _ = anatomy
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((2, *SMALL.shape), generator=g, dtype=torch.float64) * an.brain
    div = T.divergence(u, an.tensor, an.faces, SMALL.spacing)
    assert float(div.sum()) == pytest.approx(0.0, abs=1e-10 * float(u.sum()))
    assert float(div[:, ~an.brain].abs().max()) == 0.0


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dose_gy=st.floats(1.0, 8.0), tmz=st.floats(0.0, 400.0),
       ccnu=st.floats(0.0, 200.0), necrosis_delay=st.floats(0.0, 20.0))
def test_compartments_stay_within_the_carrying_capacity(anatomy, seed, dose_gy, tmz, ccnu, necrosis_delay):
    """s, r, d, n >= 0 and s + r + d + n <= 1 in every voxel, from any admissible state, under
    growth, migration, radiotherapy, both alkylators and necrosis."""
    an, p = anatomy
    p = replace(p, necrosis_delay_days=necrosis_delay, rho=0.1)
    g = torch.Generator().manual_seed(seed)
    parts = torch.rand((5, *SMALL.shape), generator=g, dtype=torch.float64)
    parts = parts / parts.sum(0, keepdim=True) * an.brain  # s, r, d, n and free space sum to 1
    state = T.TruthState(parts[0], parts[1], parts[2], parts[3], torch.full(SMALL.shape, 30.0, dtype=torch.float64), 0.0)
    regimen = T.Regimen(rt=[(1.4, dose_gy), (2.4, dose_gy)], tmz=[(0.3, tmz)] if tmz else [],
                        ccnu=[(3.3, ccnu)] if ccnu else [], bev=[])
    for t in (1.0, 2.4, 5.0, 12.0):
        state = T.advance(state, t, an, p, regimen)
        for x in (state.s, state.r, state.d, state.n):
            assert float(x.min()) >= 0.0
        assert float(state.total.max()) <= 1.0 + 1e-12
        assert float(state.total[~an.brain].abs().max()) == 0.0


def test_killed_cells_clear_with_their_half_life_and_still_enhance(anatomy):
    """A fraction moves killed cells to the damaged compartment (the enhancing volume does not
    drop at once: radiological response lags), which then halves every
    clearance_half_life_days while untreated."""
    an, p = anatomy
    p = replace(p, clearance_half_life_days=21.0)
    state = _tumour(an, p)
    t0 = state.t
    regimen = T.Regimen(rt=[(t0 + 0.5, 2.0)], tmz=[], ccnu=[], bev=[])
    before = T.readout(state, an, p, 0.0)
    after_rt = T.advance(state, t0 + 0.5, an, p, regimen)
    killed = float((state.viable - after_rt.viable).sum())
    assert float(after_rt.d.sum()) > 0.05 * float(state.viable.sum())
    assert T.readout(after_rt, an, p, 0.0).enhancing_ml >= before.enhancing_ml
    later = T.advance(after_rt, t0 + 0.5 + 21.0, an, p, regimen)
    assert float(later.d.sum()) == pytest.approx(0.5 * float(after_rt.d.sum()), rel=1e-9)
    assert killed > 0.0


def test_bevacizumab_hides_enhancement_without_killing(anatomy):
    """Same tumour, 4 weeks with and without bevacizumab 10 mg/kg every 2 weeks: identical cells
    (all four compartments, ctDNA and LDH), less enhancement and no more FLAIR signal."""
    an, p = anatomy
    state = _tumour(an, p, 90.0)
    t0 = state.t
    plain = T.advance(state, t0 + 28.0, an, p, T.Regimen.empty())
    bev = T.Regimen(rt=[], tmz=[], ccnu=[], bev=[(t0 + 0.4, 10.0), (t0 + 14.4, 10.0)])
    treated = T.advance(state, t0 + 28.0, an, p, bev)
    for a, b in ((plain.s, treated.s), (plain.r, treated.r), (plain.d, treated.d), (plain.n, treated.n)):
        assert torch.equal(a, b)
    suppression = T.bev_suppression(p, T.bev_level(bev, t0 + 28.0))
    assert suppression > 0.3
    without, with_bev = T.readout(plain, an, p, 0.0), T.readout(treated, an, p, suppression)
    assert without.enhancing_ml > 0.0
    assert with_bev.enhancing_ml < 0.5 * without.enhancing_ml
    assert with_bev.flair_ml <= without.flair_ml
    assert (with_bev.ctdna, with_bev.ldh, with_bev.viable_ml) == (without.ctdna, without.ldh, without.viable_ml)


@settings(max_examples=10, deadline=None)
@given(sd=st.floats(0.05, 0.10), offset=st.floats(0.0, 0.02), seed=st.integers(0, 2**31 - 1))
def test_cellularity_maps_carry_noise_outside_the_lesion(anatomy, sd, offset, seed):
    """Where the truth holds no cell the map reads the clipped noise, mean above 0.015 (as an
    ADC-derived map does), never a clean zero background."""
    an, p = anatomy
    state = _tumour(an, p, 20.0)
    cell = T.cellularity_map(state, torch.Generator().manual_seed(seed), sd, offset)
    empty = state.occupying == 0.0
    assert int(empty.sum()) > 1000
    assert 0.015 < float(cell[empty].mean()) < 0.1
    assert float(cell.min()) >= 0.0 and float(cell.max()) <= 1.0


def test_labels_follow_brats_and_the_tumour():
    """Necrosis (1) where the necrotic compartment dominates, enhancing (4) where leakage is
    high, 2 around them; FLAIR (any label) contains the enhancing region."""
    g = torch.Generator().manual_seed(5)
    tissue = synthetic_brain(SMALL, g)
    p = _params(oedema_sd_mm=4.0, damaged_leak=1.0)
    an = T.build_anatomy(SMALL, tissue, p, g)
    x = SMALL.coords(dtype=torch.float64)
    r = (x - torch.tensor(SMALL.center_mm, dtype=torch.float64)).norm(dim=-1)
    brain = an.brain.to(torch.float64)
    n = (r < 4.0).to(torch.float64) * 0.9 * brain
    s = ((r >= 4.0) & (r < 9.0)).to(torch.float64) * 0.95 * brain
    zero = torch.zeros_like(s)
    labels = T.label_map(T.TruthState(s, zero, zero, n, zero, 0.0), an, p, 0.0)
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2, 4}
    assert bool((labels[(n > 0.5)] == T.NECROSIS_LABEL).all())
    assert bool((labels[(s > 0.9)] == T.ENHANCING_LABEL).all())
    assert int((labels == T.OEDEMA_LABEL).sum()) > 0
    assert bool((labels[~an.brain] == 0).all())


def test_same_seed_same_patient_same_bytes(tmp_path):
    """Two generations of one (seed, index) write byte-identical events and images and hold
    identical truths; another index differs."""
    a, b = generate_patient(0, 5, TINY_COHORT), generate_patient(0, 5, TINY_COHORT)
    for k in a.truth:
        assert torch.equal(a.truth[k], b.truth[k])
    ea, eb = patient_events(a, tmp_path / "a"), patient_events(b, tmp_path / "b")
    assert [d.event for d in ea] == [d.event for d in eb]
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.nii.gz"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.nii.gz"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    other = generate_patient(1, 5, TINY_COHORT)
    assert not torch.equal(other.truth["viable_ml"], a.truth["viable_ml"])


def test_standard_of_care_is_stupp():
    course = first_line(14, escalate=True)
    rt = [e for e in course if e.kind == "radiotherapy"]
    tmz = [e for e in course if e.drug == "temozolomide"]
    assert len(rt) == 30 and sum(e.dose for e in rt) == 60.0
    assert all(int(e.t) % 7 < 5 for e in rt)  # weekdays (day 0 is a Monday)
    concomitant = [e for e in tmz if e.regimen == "stupp-concomitant"]
    assert len(concomitant) == int(rt[-1].t) - 14 + 1 and all(e.dose == 75.0 for e in concomitant)
    adjuvant = [e for e in tmz if e.regimen == "stupp-adjuvant"]
    assert len(adjuvant) == 30 and {e.cycle for e in adjuvant} == set(range(1, 7))
    assert min(e.t for e in adjuvant) - int(rt[-1].t) == pytest.approx(28 + 8 / 24)
    assert [e.dose for e in adjuvant if e.cycle == 1] == [150.0] * 5 and {e.dose for e in adjuvant if e.cycle > 1} == {200.0}


def test_second_lines_rotate_over_a_seeds_patients():
    for seed in (1, 2, 77):
        assert {second_line_of(i, seed) for i in range(5, 9)} == set(SECOND_LINES)


def test_truth_maps_cover_every_start_of_a_cuts_forecast():
    """A cut's forecast starts between the scan and its (possibly late) delivery: for every
    such start and horizon a truth map within half a day is kept."""
    p = generate_patient(2, 9, replace(TINY_COHORT, late_probability=0.5))
    assert any(s.delivery_hours > 48.0 for s in p.scans)  # some scans delivered days late
    for s in p.scans[2:]:
        for h in p.config.horizons:
            for k in range(11):
                day = s.t + k / 10 * s.delivery_hours / 24.0 + h
                if day <= p.config.end_day - 1:
                    assert abs(p.map_at(day)[0] - day) <= 0.5
