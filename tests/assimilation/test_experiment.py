"""The twin-experiment runner, briefly (the long Lorenz-96 runs are in test_l96_validation)."""

from __future__ import annotations

import torch

from assimilation import ETKF, run_twin_experiment
from models.lorenz96 import l96_rk4_step


def test_twin_experiment_short_l96_run():
    g = torch.Generator().manual_seed(0)
    truth = 8.0 + torch.randn(2, 40, generator=g, dtype=torch.float64)
    for _ in range(300):
        truth = l96_rk4_step(truth)
    X0 = truth[:, None, :] + torch.randn(2, 20, 40, generator=g, dtype=torch.float64)
    res = run_twin_experiment(l96_rk4_step, lambda X: X, ETKF(inflation=1.02), truth, X0,
                              torch.ones(2, 40, dtype=torch.float64), n_cycles=150, spin_up=50,
                              obs_generator=g)
    assert res.rmse.shape == (150, 2) and res.spread.shape == (150, 2)
    # Far below the observation error (1) once spun up; the first analysis is not.
    assert bool((res.time_mean_rmse < 0.35).all())
    assert bool((res.rmse[0] > res.time_mean_rmse).all())
    assert torch.equal(res.time_mean_rmse, res.rmse[50:].mean(0))
