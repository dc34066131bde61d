"""The Lorenz-96 model used by the validation twin experiments."""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from models.lorenz96 import l96_rk4_step, l96_tendency


def test_tendency_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    # i = 0: (x1 - x3) * x4 - x0 + F = (2 - 4) * 5 - 1 + 8 = -3
    # i = 2: (x3 - x0) * x1 - x2 + F = (4 - 1) * 2 - 3 + 8 = 11
    f = l96_tendency(x, F=8.0)
    assert f[0].item() == -3.0 and f[2].item() == 11.0
    assert torch.equal(l96_tendency(torch.full((40,), 8.0)), torch.zeros(40))


def test_rk4_step_is_fourth_order_and_batches():
    g = torch.Generator().manual_seed(0)
    x = 8.0 + torch.randn(3, 4, 40, generator=g, dtype=torch.float64)
    step = l96_rk4_step(x, dt=0.05)
    assert step.shape == x.shape
    z0 = x[1, 2].numpy()
    sol = solve_ivp(lambda t, z: l96_tendency(torch.from_numpy(z)).numpy(), (0.0, 0.05), z0,
                    method="DOP853", rtol=1e-13, atol=1e-13).y[:, -1]
    errors = []
    for k in (1, 2, 4):
        z = x[1, 2]
        for _ in range(k):
            z = l96_rk4_step(z, dt=0.05 / k)
        errors.append(np.abs(z.numpy() - sol).max())
    assert errors[0] < 1e-2
    order = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((order > 3.7) & (order < 4.3)), order
    assert torch.equal(step[1, 2], l96_rk4_step(x[1, 2], dt=0.05))
    assert l96_rk4_step(x.float()).dtype == torch.float32
