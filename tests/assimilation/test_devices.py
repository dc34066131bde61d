"""Device and dtype follow the inputs; results agree across devices (CUDA when present)."""

from __future__ import annotations

import pytest
import torch

from assimilation import ETKF, LETKF, Observations, StochasticEnKF, VoxelGrid

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _problem(device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    grid = VoxelGrid((8, 8, 8), block=4, n_extra=2)
    X = torch.randn(2, 12, grid.n_state, generator=g, dtype=torch.float64)
    vox = torch.randperm(512, generator=g)[:60].sort().values
    loc = torch.stack([vox // 64, (vox // 8) % 8, vox % 8], dim=-1).to(torch.float64)
    obs = Observations(y=torch.randn(2, 60, generator=g, dtype=torch.float64),
                       r_var=torch.full((2, 60), 0.5, dtype=torch.float64), locations=loc.expand(2, 60, 3))
    to = dict(device=device, dtype=dtype)
    obs = Observations(y=obs.y.to(**to), r_var=obs.r_var.to(**to), locations=obs.locations.to(**to))
    return grid, X.to(**to), obs, vox.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filters_follow_device_and_dtype(device, dtype):
    grid, X, obs, vox = _problem(device, dtype)
    h = lambda Z: Z[..., vox]  # noqa: E731
    ref_grid, X64, obs64, vox64 = _problem("cpu", torch.float64)
    filters = [ETKF(inflation=1.02), LETKF(geometry=grid, radius=3.0, rtps=0.5), StochasticEnKF()]
    for filt in filters:
        gen = torch.Generator(device=device).manual_seed(1)
        res = filt.analyse(X, obs, h=h, generator=gen)
        assert res.X_a.device.type == device and res.X_a.dtype == dtype
        assert res.diagnostics.spread_analysis.device.type == device
        if isinstance(filt, StochasticEnKF):
            continue  # its perturbations are drawn in X's dtype on X's device: other numbers
        ref = filt.analyse(X64, obs64, h=lambda Z: Z[..., vox64],
                           generator=torch.Generator().manual_seed(1)).X_a
        tol = 1e-3 if dtype == torch.float32 else 1e-9
        assert float((res.X_a.cpu().double() - ref).abs().max()) < tol, type(filt).__name__
