"""Burden/marker ODE model: analytic growth laws, marker kinetics, treatment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from models import BurdenParams, Schedule, simulate_burden

F64 = torch.float64


def bparams(model: str = "gompertz", batch: int = 1, **over: float) -> BurdenParams:
    p = BurdenParams.reference(batch, model=model, dtype=F64)
    for name, value in over.items():
        setattr(p, name, torch.full((batch,), float(value), dtype=F64))
    return p


def test_logistic_burden_matches_the_analytic_curve() -> None:
    p = bparams("logistic", rho=0.03, capacity=500.0)
    n0 = torch.tensor([2.0], dtype=F64)
    times = [30.0, 100.0, 250.0, 400.0]
    res = simulate_burden(n0, torch.zeros(1, dtype=F64), p, 0.0, 400.0, dt=7.0, save_at=times)
    for t, got in zip(times, res.saved.n[:, 0].tolist()):
        e = math.exp(0.03 * t)
        assert got == pytest.approx(500.0 * 2.0 * e / (500.0 + 2.0 * (e - 1.0)), rel=1e-12)
    assert 0.9 * 500.0 < float(res.n) < 500.0       # near capacity by day 400


def test_gompertz_burden_matches_the_analytic_curve() -> None:
    p = bparams("gompertz", rho=0.01, capacity=1000.0)
    n0 = torch.tensor([1.0, 50.0], dtype=F64)
    res = simulate_burden(n0, torch.zeros(2, dtype=F64), p, 0.0, 300.0, dt=10.0)
    want = 1000.0 * torch.exp(torch.log(n0 / 1000.0) * math.exp(-0.01 * 300.0))
    assert torch.allclose(res.n, want, rtol=1e-12)
    assert float(res.n[0]) > 100.0 * float(n0[0])    # real growth happened


def test_marker_relaxes_exponentially_to_its_steady_state() -> None:
    # Constant burden (rho = 0): M(t) = M* + (M0 - M*) e^{-k t}, M* = (s N + b) / k.
    p = bparams(rho=0.0)
    k, s, b = float(p.clearance), float(p.shed), float(p.baseline)
    n0, m0 = 20.0, 0.5
    m_star = (s * n0 + b) / k
    assert m_star == pytest.approx(3.5 * 20.0 + 1.0)   # 3.5 ng/mL per mL + 1 ng/mL benign
    res = simulate_burden(torch.tensor([n0], dtype=F64), torch.tensor([m0], dtype=F64), p,
                          0.0, 60.0, dt=1.5, save_at=[3.0, 60.0])
    assert float(res.saved.m[0, 0]) == pytest.approx(m_star + (m0 - m_star) * math.exp(-3.0 * k), rel=1e-12)
    assert float(res.m) == pytest.approx(m_star, rel=1e-5)


def test_marker_tracks_a_growing_burden_like_a_fine_ode_solution() -> None:
    p = bparams("gompertz", rho=0.05, capacity=200.0)
    k, s, b, rho, cap = (float(getattr(p, n)) for n in ("clearance", "shed", "baseline", "rho", "capacity"))

    def rhs(_t, y):
        n, m = y
        return [rho * n * math.log(cap / n), s * n - k * m + b]

    ref = solve_ivp(rhs, (0.0, 120.0), [1.0, 1.0], rtol=1e-11, atol=1e-12, t_eval=[120.0])
    res = simulate_burden(torch.tensor([1.0], dtype=F64), torch.tensor([1.0], dtype=F64), p,
                          0.0, 120.0, dt=1.0)
    assert float(res.n) == pytest.approx(ref.y[0, -1], rel=1e-10)
    assert float(res.m) == pytest.approx(ref.y[1, -1], rel=1e-4)   # N linear across a step


def test_burden_chemo_is_exact_and_step_independent() -> None:
    doses = [(0.5, 1.0), (3.0, 2.0), (7.25, 1.0)]
    p = bparams(rho=0.0, k_chemo=0.2)
    lam = float(p.chemo_decay)
    want = math.exp(-0.2 * sum(d / lam * (1 - math.exp(-lam * (10.0 - t))) for t, d in doses))
    for dt in [0.05, 0.5, 2.0]:
        res = simulate_burden(torch.tensor([10.0], dtype=F64), torch.zeros(1, dtype=F64), p, 0.0, 10.0,
                              dt=dt, schedule=Schedule.from_lists(chemo=doses))
        assert float(res.n) / 10.0 == pytest.approx(want, rel=1e-12)


def test_burden_rt_course_and_growth_with_chemo_match_an_ode_solver() -> None:
    # Weekday 2 Gy x 30 on a non-growing burden: exactly LQ^30 (alpha 0.15, alpha/beta 1.5).
    fr, day = [], 0
    while len(fr) < 30:
        if day % 7 < 5:
            fr.append((day + 0.375, 2.0))
        day += 1
    p = bparams(rho=0.0)
    res = simulate_burden(torch.tensor([5.0], dtype=F64), torch.zeros(1, dtype=F64), p, 0.0, 42.0,
                          dt=2.0, schedule=Schedule.from_lists(rt=fr))
    # log-kill per fraction: alpha d + (alpha / (alpha/beta)) d^2 = 0.3 + 0.1 * 4
    assert float(res.n) / 5.0 == pytest.approx(math.exp(-30 * (0.3 + 0.4)), rel=1e-12)

    # Growth + chemo together (Strang splitting) against a tight ODE solve.
    p = bparams("logistic", rho=0.05, capacity=100.0, k_chemo=0.1)
    lam = float(p.chemo_decay)
    doses = [(2.0 + 3 * i, 1.0) for i in range(6)]

    def rhs(t, y):
        c = sum(d * math.exp(-lam * (t - tk)) for tk, d in doses if t >= tk)
        return [0.05 * y[0] * (1 - y[0] / 100.0) - 0.1 * c * y[0]]

    ref = solve_ivp(rhs, (0.0, 30.0), [10.0], rtol=1e-10, atol=1e-12, max_step=0.01)
    got = simulate_burden(torch.tensor([10.0], dtype=F64), torch.zeros(1, dtype=F64), p, 0.0, 30.0,
                          dt=0.5, schedule=Schedule.from_lists(chemo=doses))
    assert float(got.n) == pytest.approx(ref.y[0, -1], rel=1e-3)
    assert float(got.n) < 0.8 * 10.0 * math.exp(0.05 * 30)    # chemo made a difference


def test_burden_batch_equals_one_by_one_and_float32_works() -> None:
    p = BurdenParams.reference(3)
    p.rho = torch.tensor([0.01, 0.02, 0.04])
    sched = Schedule.from_plans(rt=[[(1.375, 2.0)], [], [(5.0, 3.0)]], chemo=[[], [(2.0, 1.0)], []])
    n0 = torch.tensor([1.0, 5.0, 20.0])
    m0 = torch.tensor([2.0, 3.0, 4.0])
    both = simulate_burden(n0, m0, p, 0.0, 10.0, dt=1.0, schedule=sched)
    assert both.n.dtype == torch.float32
    for i in range(3):
        one = simulate_burden(n0[i:i + 1], m0[i:i + 1], p.index(i), 0.0, 10.0, dt=1.0,
                              schedule=sched.index(i))
        assert float(one.n) == pytest.approx(float(both.n[i]), rel=1e-6)
        assert float(one.m) == pytest.approx(float(both.m[i]), rel=1e-6)
    assert np.isfinite(both.m.numpy()).all()
