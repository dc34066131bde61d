"""The 3-D reaction-diffusion simulator: conservation, fronts, reaction, treatment, stepping."""

from __future__ import annotations

import math

import pytest
import torch

from models import (DiffusionOperator, Grid, Schedule, TumorParams, diffusion_weight,
                    gaussian_blob, resolve_device, simulate, stable_dt)

SCHEMES = ["explicit", "imex"]


def params(batch: int = 1, dtype: torch.dtype = torch.float32, **over: float) -> TumorParams:
    p = TumorParams.reference(batch, dtype=dtype)
    for name, value in over.items():
        setattr(p, name, torch.full((batch,), float(value), dtype=dtype))
    return p


def seed(grid: Grid, weight: torch.Tensor, center=(0.5, 0.5, 0.5), sigma: float = 2.0,
         peak: float = 0.6) -> torch.Tensor:
    c = torch.tensor([[f * e for f, e in zip(center, grid.extent_mm)]], dtype=weight.dtype)
    return gaussian_blob(grid, c, torch.tensor([sigma], dtype=weight.dtype), peak) * (weight > 0)


def weekday_fractions(n: int = 30, dose: float = 2.0, start: float = 0.0) -> list[tuple[float, float]]:
    """``n`` fractions at 09:00 (0.375 day) Monday to Friday, day 0 a Monday."""
    out, day = [], 0
    while len(out) < n:
        if day % 7 < 5:
            out.append((start + day + 0.375, dose))
        day += 1
    return out


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_pure_diffusion_conserves_mass_on_irregular_tissue(brain24, scheme: str) -> None:
    # float64, so what is measured is the scheme (flux form + zero-sum CG), not rounding.
    grid, labels = brain24
    w = diffusion_weight(labels, dtype=torch.float64)[None]
    u0 = seed(grid, w, center=(0.3, 0.5, 0.7), sigma=2.5)
    p = params(dtype=torch.float64, D=1.0, rho=0.0)
    res = simulate(u0, w, p, grid, 0.0, 30.0, dt=1.0, scheme=scheme)
    m0, m1 = float(u0.sum()), float(res.u.sum())
    assert abs(m1 - m0) / m0 < 1e-10
    # ...and the test is not vacuous: the blob spread out and mass piled against the no-flux
    # boundaries (tissue voxels next to OUTSIDE hold density), yet nothing leaked outside.
    assert float(res.u.max()) < 0.5 * float(u0.max())
    outside = labels == 0
    touches = torch.nn.functional.max_pool3d(outside[None, None].double(), 3, 1, 1)[0, 0] > 0
    assert float(res.u[0][touches & ~outside].max()) > 0.01
    assert float(res.u[0][outside].abs().max()) == 0.0


def test_imex_conserves_mass_even_when_cg_is_stopped_early(brain24) -> None:
    grid, labels = brain24
    w = diffusion_weight(labels, dtype=torch.float64)[None]
    u0 = seed(grid, w, sigma=3.0)
    p = params(dtype=torch.float64, D=1.0, rho=0.0)
    res = simulate(u0, w, p, grid, 0.0, 20.0, dt=5.0, scheme="imex", cg_max_iter=3)
    converged = simulate(u0, w, p, grid, 0.0, 20.0, dt=5.0, scheme="imex", cg_tol=1e-12)
    assert res.cg_iterations == 4 * 3
    assert float((res.u - converged.u).abs().max()) > 1e-3    # really truncated...
    assert abs(float(res.u.sum()) - float(u0.sum())) / float(u0.sum()) < 1e-10   # ...yet conserving


def test_float32_mass_drift_is_rounding_only(brain24) -> None:
    grid, labels = brain24
    w = diffusion_weight(labels)[None]
    u0 = seed(grid, w, sigma=3.0)
    for scheme in SCHEMES:
        res = simulate(u0, w, params(D=1.0, rho=0.0), grid, 0.0, 30.0, dt=1.0, scheme=scheme)
        assert abs(float(res.u.double().sum()) / float(u0.double().sum()) - 1.0) < 1e-5


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,dt", [("explicit", 0.02), ("imex", 0.05)])
def test_fisher_kpp_front_speed(scheme: str, dt: float) -> None:
    # Nondimensional D = rho = 1 (lengths in sqrt(D/rho), times in 1/rho): the asymptotic speed
    # is 2 sqrt(D rho) = 2. From a step, the front lags by (3/2) ln t (Bramson), so the mean
    # speed between t = 30 and 60 is 2 - 1.5 ln 2 / 30 = 1.965: measuring late keeps the log
    # correction at 1.7 %, well inside the 5 % budget. h = 0.2 resolves the front (width ~ 1).
    n, h = 700, 0.2
    grid = Grid((1, 1, n), (1.0, 1.0, h))
    z = grid.coords(dtype=torch.float64)[..., 2]
    u0 = (z < 5.0).double().unsqueeze(0)
    w = torch.ones((1, 1, 1, n), dtype=torch.float64)
    p = params(dtype=torch.float64, D=1.0, rho=1.0)
    res = simulate(u0, w, p, grid, 0.0, 60.0, dt=dt, scheme=scheme, save_at=[30.0, 60.0])

    def front(u: torch.Tensor) -> float:
        prof = u[0, 0, 0]
        k = int(torch.nonzero(prof < 0.5)[0])          # first voxel below 1/2
        za, zb, ua, ub = float(z[0, 0, k - 1]), float(z[0, 0, k]), float(prof[k - 1]), float(prof[k])
        return za + (ua - 0.5) / (ua - ub) * (zb - za)

    speed = (front(res.saved[1]) - front(res.saved[0])) / 30.0
    assert abs(speed - 2.0) / 2.0 < 0.05
    assert abs(speed - (2.0 - 1.5 * math.log(2.0) / 30.0)) < 0.03  # Bramson-corrected value


# 3 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_without_diffusion_each_voxel_follows_the_logistic_curve(scheme: str) -> None:
    grid = Grid((6, 6, 6))
    u0 = torch.rand((2, 6, 6, 6), generator=torch.Generator().manual_seed(0)) * 0.9 + 0.01
    w = torch.ones((1, 6, 6, 6))
    rho, t = 0.05, 100.0
    res = simulate(u0, w, params(2, D=0.0, rho=rho), grid, 0.0, t, dt=3.0, scheme=scheme)
    e = math.exp(rho * t)
    exact = u0 * e / (1.0 - u0 + u0 * e)
    assert float((res.u - exact).abs().max()) < 1e-5   # spec: 1e-3; the flow is exact


# 4 -------------------------------------------------------------------------------------------
def test_single_rt_fraction_multiplies_by_lq_survival() -> None:
    grid = Grid((5, 5, 5))
    u0 = torch.rand((3, 5, 5, 5), generator=torch.Generator().manual_seed(1))
    w = torch.ones((1, 5, 5, 5))
    p = params(3, D=0.0, rho=0.0)
    p.alpha = torch.tensor([0.05, 0.1, 0.3])
    p.alpha_beta = torch.tensor([10.0, 3.0, 2.0])
    sched = Schedule.from_lists(rt=[(1.5, 2.0)], batch=3)
    res = simulate(u0, w, p, grid, 0.0, 3.0, dt=1.0, schedule=sched)
    want = torch.exp(-p.alpha * 2.0 - (p.alpha / p.alpha_beta) * 4.0)
    ratio = (res.u / u0).flatten(1)
    assert torch.allclose(ratio, want[:, None].expand_as(ratio), rtol=2e-7, atol=0)
    assert res.rt_applied.tolist() == [1, 1, 1]
    assert float(want[0]) == pytest.approx(math.exp(-0.12), rel=1e-7)


# 5 -------------------------------------------------------------------------------------------
def test_chemo_kill_is_independent_of_step_and_exact() -> None:
    grid = Grid((3, 3, 3))
    u0 = torch.full((1, 3, 3, 3), 0.5, dtype=torch.float64)
    w = torch.ones((1, 3, 3, 3), dtype=torch.float64)
    doses = [(0.3, 1.0), (1.7, 1.0), (2.1, 2.0), (5.2, 1.0), (9.0, 1.5)]
    sched = Schedule.from_lists(chemo=doses)
    p = params(dtype=torch.float64, D=0.0, rho=0.0, k_chemo=0.3)
    lam, t1 = float(p.chemo_decay), 10.0
    exact = math.exp(-0.3 * sum(d / lam * (1.0 - math.exp(-lam * (t1 - tk))) for tk, d in doses))
    fractions = []
    for dt in [0.05, 0.1, 0.5, 1.0, 2.0]:
        res = simulate(u0, w, p, grid, 0.0, t1, dt=dt, schedule=sched)
        fractions.append(float(res.u[0, 1, 1, 1]) / 0.5)
    assert max(fractions) / min(fractions) - 1.0 < 0.01       # spec: 1 %
    assert fractions == pytest.approx([exact] * 5, rel=1e-10)  # closed form: exact at any step
    assert exact < 0.5                                          # a kill worth measuring


# 6 -------------------------------------------------------------------------------------------
def test_weekday_fractions_at_nine_are_all_applied_with_two_day_steps() -> None:
    grid = Grid((4, 4, 4))
    u0 = torch.full((1, 4, 4, 4), 0.8, dtype=torch.float64)
    w = torch.ones((1, 4, 4, 4), dtype=torch.float64)
    fr = weekday_fractions(30)
    sched = Schedule.from_lists(rt=fr)
    p = params(dtype=torch.float64, D=0.0, rho=0.0)
    res = simulate(u0, w, p, grid, 0.0, 42.0, dt=2.0, schedule=sched)
    assert res.rt_applied.tolist() == [30]
    assert float(res.u[0, 0, 0, 0]) / 0.8 == pytest.approx(math.exp(-30 * 0.12), rel=1e-12)

    # In pieces cut at fraction times and in between, each fraction still applies exactly once.
    cuts = [0.0, 0.375, 3.0, 7.375, 7.375, 20.0, 30.375, 42.0]
    u, total = u0, 0
    for a, b in zip(cuts, cuts[1:]):
        r = simulate(u, w, p, grid, a, b, dt=2.0, schedule=sched)
        u, total = r.u, total + int(r.rt_applied)
    assert total == 30
    assert float(u[0, 0, 0, 0]) == pytest.approx(float(res.u[0, 0, 0, 0]), rel=1e-12)


def test_fractions_apply_in_a_growing_diffusing_tumour_too(brain24) -> None:
    grid, labels = brain24
    w = diffusion_weight(labels)[None]
    u0 = seed(grid, w)
    sched = Schedule.from_lists(rt=weekday_fractions(30), chemo=[(d + 0.375, 1.0) for d in range(42)])
    res = simulate(u0, w, params(), grid, 0.0, 45.0, dt=2.0, schedule=sched)
    free = simulate(u0, w, params(), grid, 0.0, 45.0, dt=2.0)
    assert res.rt_applied.tolist() == [30]
    # 30 x 2 Gy leaves exp(-3.6) = 2.7 % of a non-growing population; with regrowth during
    # treatment the burden ratio treated / untreated must still be far below 1.
    assert float(res.u.sum() / free.u.sum()) < 0.1


# 7 -------------------------------------------------------------------------------------------
def test_explicit_step_beyond_stability_is_substepped(brain24) -> None:
    grid, labels = brain24
    w = diffusion_weight(labels)[None]
    u0 = seed(grid, w, peak=0.9, sigma=2.0)
    p = params(D=1.0, rho=0.2)
    dt_max = float(stable_dt(p, w, grid)[0])
    assert dt_max == pytest.approx(1.5 ** 2 / 6.0, rel=1e-6)   # h^2 / (2 dim D_max)
    # A raw forward-Euler step 5x beyond the limit overshoots: what the guard prevents.
    raw = u0 + 5 * dt_max * DiffusionOperator(w, grid).laplacian(u0)
    assert float(raw.min()) < -0.02
    res = simulate(u0, w, p, grid, 0.0, 20.0, dt=5 * dt_max, scheme="explicit")
    assert res.n_steps >= math.ceil(20.0 / (0.9 * dt_max))
    assert 0.0 <= float(res.u.min()) and float(res.u.max()) <= 1.0
    fine = simulate(u0, w, p, grid, 0.0, 20.0, dt=0.02, scheme="explicit")
    assert float((res.u - fine.u).abs().max()) < 5e-3


def test_imex_two_day_steps_match_fine_explicit_on_a_glioma_course(brain32) -> None:
    # Realistic HGG: reference parameters, 1 mm voxels, 60 days with chemoradiation from day 7.
    # Tolerance: max |u_imex - u_fine| < 0.02 (density units) and total burden within 1 %.
    grid, labels = brain32
    w = diffusion_weight(labels)[None]
    u0 = seed(grid, w, center=(0.4, 0.55, 0.5), sigma=2.5, peak=0.5)
    sched = Schedule.from_lists(rt=weekday_fractions(30, start=7.0),
                                chemo=[(7.375 + d, 1.0) for d in range(42)])
    p = params()
    imex = simulate(u0, w, p, grid, 0.0, 60.0, dt=2.0, scheme="imex", schedule=sched)
    fine = simulate(u0, w, p, grid, 0.0, 60.0, dt=0.1, scheme="explicit", schedule=sched)
    assert imex.rt_applied.tolist() == fine.rt_applied.tolist() == [30]
    assert float((imex.u - fine.u).abs().max()) < 0.02
    assert float(imex.u.sum() / fine.u.sum()) == pytest.approx(1.0, abs=0.01)


# 8 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_batched_run_equals_members_one_by_one_and_inputs_untouched(brain24, scheme: str) -> None:
    grid, labels = brain24
    b = 3
    w = diffusion_weight(labels)[None]
    g = torch.Generator().manual_seed(5)
    u0 = torch.cat([seed(grid, w, center=(0.3 + 0.2 * i, 0.5, 0.5), peak=0.3 + 0.2 * i)
                    for i in range(b)])
    p = TumorParams.reference(b)
    p.D = torch.tensor([0.05, 0.3, 1.0])        # the last one needs stability sub-steps at dt=0.5
    p.rho = torch.rand(b, generator=g) * 0.1
    p.alpha = torch.tensor([0.03, 0.05, 0.08])
    sched = Schedule.from_plans(rt=[[(1.375, 2.0), (2.375, 2.0)], [(2.0, 5.0)], []],
                                chemo=[[(0.5, 1.0)], [], [(1.0, 2.0), (3.0, 1.0)]])
    clones = (u0.clone(), w.clone(), p.as_tensor().clone(),
              [t.clone() for t in (sched.rt_times, sched.rt_doses, sched.chemo_times, sched.chemo_doses)])
    kw = dict(dt=0.5, scheme=scheme, save_at=[1.0, 2.375, 4.0])
    batched = simulate(u0, w, p, grid, 0.0, 4.0, schedule=sched, **kw)
    for i in range(b):
        one = simulate(u0[i:i + 1], w, p.index(i), grid, 0.0, 4.0, schedule=sched.index(i), **kw)
        assert float((batched.u[i] - one.u[0]).abs().max()) < 1e-6
        assert float((batched.saved[:, i] - one.saved[:, 0]).abs().max()) < 1e-6
        assert int(batched.rt_applied[i]) == int(one.rt_applied[0])
    assert batched.rt_applied.tolist() == [2, 1, 0]
    assert torch.equal(u0, clones[0]) and torch.equal(w, clones[1])
    assert torch.equal(p.as_tensor(), clones[2])
    for t, c in zip((sched.rt_times, sched.rt_doses, sched.chemo_times, sched.chemo_doses), clones[3]):
        assert torch.equal(t, c)


# dtype / device / saving ---------------------------------------------------------------------
def test_float64_run_agrees_with_float32(brain24) -> None:
    grid, labels = brain24
    w32 = diffusion_weight(labels)[None]
    u32 = seed(grid, w32)
    r32 = simulate(u32, w32, params(), grid, 0.0, 30.0, dt=1.0)
    r64 = simulate(u32.double(), w32.double(), params(), grid, 0.0, 30.0, dt=1.0, cg_tol=1e-10)
    assert r32.u.dtype == torch.float32 and r64.u.dtype == torch.float64
    assert float((r64.u - r32.u.double()).abs().max()) < 1e-4


def test_result_follows_the_requested_device() -> None:
    dev = resolve_device("cpu")
    assert dev == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    grid = Grid((4, 4, 4))
    u0 = torch.full((2, 4, 4, 4), 0.1, device=dev)
    res = simulate(u0, torch.ones((1, 4, 4, 4), device=dev), params(2), grid, 0.0, 1.0, dt=0.5)
    assert res.u.device == dev and res.rt_applied.device == dev


def test_saved_states_equal_piecewise_runs(brain24) -> None:
    grid, labels = brain24
    w = diffusion_weight(labels, dtype=torch.float64)[None]
    u0 = seed(grid, w)
    p = params(dtype=torch.float64)
    sched = Schedule.from_lists(rt=[(5.0, 2.0)])
    whole = simulate(u0, w, p, grid, 0.0, 10.0, dt=1.0, schedule=sched, save_at=[0.0, 5.0, 10.0])
    first = simulate(u0, w, p, grid, 0.0, 5.0, dt=1.0, schedule=sched)
    assert torch.equal(whole.saved[0], u0)
    assert whole.times == (0.0, 5.0, 10.0)
    # the state saved at a fraction's time includes that fraction
    assert float((whole.saved[1] - first.u).abs().max()) < 1e-12
    assert torch.equal(whole.saved[2], whole.u)


def test_one_tissue_map_per_member_matches_single_runs(brain24) -> None:
    # weight [B, X, Y, Z]: each member its own anatomy (block-diagonal operator).
    grid, labels = brain24
    other = torch.flip(labels, dims=[0])
    w = torch.stack([diffusion_weight(labels), diffusion_weight(other)])
    u0 = torch.cat([seed(grid, w[:1]), seed(grid, w[1:], center=(0.6, 0.5, 0.5))])
    p = params(2, D=0.5)
    for scheme in SCHEMES:
        both = simulate(u0, w, p, grid, 0.0, 6.0, dt=1.0, scheme=scheme)
        for i in range(2):
            one = simulate(u0[i:i + 1], w[i:i + 1], p.index(i), grid, 0.0, 6.0, dt=1.0, scheme=scheme)
            assert float((both.u[i] - one.u[0]).abs().max()) < 1e-6
        # each member stays inside its own tissue
        assert float(both.u[0][labels == 0].abs().max()) == 0.0
        assert float(both.u[1][other == 0].abs().max()) == 0.0


def test_prebuilt_operator_gives_the_same_result(brain24) -> None:
    grid, labels = brain24
    w = diffusion_weight(labels)[None]
    u0 = seed(grid, w)
    op = DiffusionOperator(w, grid)
    a = simulate(u0, w, params(), grid, 0.0, 5.0, dt=1.0)
    b = simulate(u0, op, params(), grid, 0.0, 5.0, dt=1.0)
    assert torch.equal(a.u, b.u)
    with pytest.raises(ValueError):
        simulate(u0.double(), op, params(), grid, 0.0, 1.0, dt=1.0)   # built for float32


def test_auto_scheme_takes_explicit_where_it_is_cheap_and_imex_where_not():
    from models import Grid, TumorParams, choose_scheme, diffusion_weight, simulate
    grid = Grid((8, 8, 8), (1.0, 1.0, 1.0))
    weight = diffusion_weight(torch.full((8, 8, 8), 2, dtype=torch.long))[None]
    params = TumorParams.reference(1)
    # stable dt = 1 / (2 * 0.1 * 3) = 1.67 days at 1 mm
    assert choose_scheme(params, weight, grid, 1.0) == "explicit"
    assert choose_scheme(params, weight, grid, 20.0) == "imex"
    u0 = torch.zeros(1, 8, 8, 8)
    u0[0, 4, 4, 4] = 0.5
    auto = simulate(u0, weight, params, grid, 0.0, 10.0, dt=1.0, scheme="auto").u
    explicit = simulate(u0, weight, params, grid, 0.0, 10.0, dt=1.0, scheme="explicit").u
    assert torch.equal(auto, explicit)
