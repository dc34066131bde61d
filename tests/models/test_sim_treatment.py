"""Schedules, dose-response laws and the treatment-aware step grid."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate

from models import Schedule, chemo_exposure, lq_survival, plan_steps


def test_lq_survival_of_a_2gy_fraction() -> None:
    # alpha 0.05 /Gy, alpha/beta 10 Gy: beta = 0.005 /Gy^2, log-kill 0.1 + 0.02.
    s = lq_survival(torch.tensor(2.0), torch.tensor(0.05), torch.tensor(10.0))
    assert float(s) == pytest.approx(math.exp(-0.12), rel=1e-7)


@pytest.mark.parametrize("lam", [0.0, 0.3, math.log(2.0), 5.0])
def test_chemo_exposure_is_the_exact_integral(lam: float) -> None:
    times = torch.tensor([[-3.0, 1.25, 2.0, 4.5, 9.0, math.inf]], dtype=torch.float64)
    doses = torch.tensor([[2.0, 1.0, 0.5, 1.5, 3.0, 0.0]], dtype=torch.float64)
    t0, t1 = 1.0, 6.0

    def conc(t: float) -> float:
        return sum(d * math.exp(-lam * (t - tk)) for tk, d in zip(times[0].tolist(), doses[0].tolist())
                   if t >= tk)

    want, _ = integrate.quad(conc, t0, t1, points=[1.25, 2.0, 4.5], epsabs=1e-13, epsrel=1e-13)
    got = chemo_exposure(t0, t1, times, doses, torch.tensor([lam], dtype=torch.float64))
    assert got.shape == (1,)
    assert float(got) == pytest.approx(want, rel=1e-10)
    # Additive over a cut: [t0, 3] + [3, t1] is the whole.
    parts = sum(float(chemo_exposure(a, b, times, doses, torch.tensor([lam], dtype=torch.float64)))
                for a, b in [(t0, 3.0), (3.0, t1)])
    assert parts == pytest.approx(want, rel=1e-10)


def test_schedule_padding_batching_and_shift() -> None:
    s = Schedule.from_plans(rt=[[(2.0, 2.0), (1.0, 1.8)], []], chemo=[[], [(0.5, 1.0)]])
    assert s.rt_times.tolist() == [[1.0, 2.0], [math.inf, math.inf]]
    assert s.rt_doses.tolist() == [[1.8, 2.0], [0.0, 0.0]]
    assert s.total_rt_dose().tolist() == pytest.approx([3.8, 0.0])
    r = s.repeat(3)
    assert r.batch_size == 6 and r.rt_times[2, 0] == 1.0 and math.isinf(r.rt_times[3, 0])
    c = Schedule.cat([s, Schedule.from_lists(rt=[(0.1, 1.0)] * 3)])
    assert c.rt_times.shape == (3, 3) and c.batch_size == 3
    sh = s.shift(10.0)
    assert sh.rt_times[0].tolist() == [11.0, 12.0] and math.isinf(sh.rt_times[1, 0])
    assert s.rt_times[0, 0] == 1.0  # shift returned a new schedule
    e = Schedule.empty(4)
    assert e.batch_size == 4 and e.rt_times.shape == (4, 0)


def test_step_grid_breaks_at_fractions_in_half_open_interval() -> None:
    sched = Schedule.from_plans(rt=[[(0.0, 2.0), (3.375, 2.0)], [(3.375, 2.0), (10.0, 2.0)]])
    segs = plan_steps(0.0, 10.0, 2.0, sched, save_at=[5.0])
    ends = [s.t_end for s in segs]
    # fraction at t0 = 0 belongs to the previous call; the one at t1 = 10 to this one
    assert ends == [3.375, 5.0, 10.0]
    assert [s.rt for s in segs] == [True, False, True]
    assert [s.n_steps for s in segs] == [2, 1, 3]
    assert all(s.step <= 2.0 + 1e-12 for s in segs)
    assert segs[1].save_indices == (0,)
    with pytest.raises(ValueError):
        plan_steps(0.0, 10.0, 2.0, sched, save_at=[11.0])
