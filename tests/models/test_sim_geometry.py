"""Grid geometry, tissue labels and the synthetic brain."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import ndimage

from models import GRAY, OUTSIDE, TISSUE_WEIGHT, WHITE, Grid, diffusion_weight, gaussian_blob, synthetic_brain


def test_grid_volume_and_coords_are_in_mm() -> None:
    grid = Grid((4, 5, 6), (1.0, 1.0, 3.0))
    assert grid.voxel_volume_ml == pytest.approx(0.003)
    assert grid.extent_mm == (4.0, 5.0, 18.0)
    xyz = grid.coords(dtype=torch.float64)
    assert xyz.shape == (4, 5, 6, 3)
    # voxel centres: (i + 1/2) h
    assert xyz[3, 4, 5].tolist() == [3.5, 4.5, 16.5]
    with pytest.raises(ValueError):
        Grid((4, 4, 4), (1.0, 0.0, 1.0))


def test_gaussian_blob_peak_and_width() -> None:
    grid = Grid((1, 1, 201), (1.0, 1.0, 0.1))
    u = gaussian_blob(grid, torch.tensor([[0.5, 0.5, 10.05]]), torch.tensor([2.0]), 0.8)
    z = grid.coords()[0, 0, :, 2]
    assert u.shape == (1, 1, 1, 201)
    assert float(u.max()) == pytest.approx(0.8, rel=1e-6)
    # value one sigma away from the centre: peak * exp(-1/2)
    k = int(torch.argmin((z - 12.05).abs()))
    assert float(u[0, 0, 0, k]) == pytest.approx(0.8 * math.exp(-0.5), rel=1e-5)


def test_diffusion_weight_white_is_five_times_gray() -> None:
    labels = torch.tensor([[OUTSIDE, GRAY, WHITE]])
    w = diffusion_weight(labels)
    assert w.dtype == torch.float32 and w.shape == labels.shape
    assert w.tolist() == [[0.0, pytest.approx(0.2), 1.0]]
    assert TISSUE_WEIGHT[WHITE] / TISSUE_WEIGHT[GRAY] == pytest.approx(5.0)
    with pytest.raises(ValueError):
        diffusion_weight(torch.tensor([3]))


def test_synthetic_brain_is_deterministic_per_seed() -> None:
    grid = Grid((24, 24, 24), (2.0, 2.0, 2.0))
    a = synthetic_brain(grid, torch.Generator().manual_seed(3))
    b = synthetic_brain(grid, torch.Generator().manual_seed(3))
    c = synthetic_brain(grid, torch.Generator().manual_seed(4))
    assert a.dtype == torch.long and a.shape == grid.shape
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.01


def test_synthetic_brain_anatomy(brain32) -> None:
    grid, labels = brain32
    counts = torch.bincount(labels.flatten(), minlength=3).double() / labels.numel()
    brain = counts[GRAY] + counts[WHITE]
    # An ellipsoid with semi-axes 0.45 of the box fills 4/3 pi 0.45^3 = 38 % of it; folds and
    # ventricles take a little away.
    assert 0.25 < brain < 0.40
    assert counts[WHITE] > counts[GRAY] > 0.25 * brain
    # The cortex is outermost: every brain voxel touching the exterior is gray.
    outside = (labels == OUTSIDE).numpy()
    comp, n_comp = ndimage.label(outside)
    exterior = comp == comp[0, 0, 0]
    near_exterior = ndimage.binary_dilation(exterior) & ~outside
    assert (labels.numpy()[near_exterior] == GRAY).all()
    # Ventricles: OUTSIDE pockets enclosed by tissue (interior no-flux boundaries).
    pockets = [(comp == k).sum() for k in range(1, n_comp + 1) if k != comp[0, 0, 0]]
    assert sum(pockets) >= 20
