"""Shared small fixtures for the simulator tests (grids <= 32^3 so the suite stays fast)."""

from __future__ import annotations

import pytest
import torch

from models import Grid, synthetic_brain


@pytest.fixture(scope="session")
def brain24() -> tuple[Grid, torch.Tensor]:
    """An irregular 24^3 brain with 1.5 mm voxels (cortex, white matter, ventricles): labels [X,Y,Z]."""
    grid = Grid((24, 24, 24), (1.5, 1.5, 1.5))
    return grid, synthetic_brain(grid, torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def brain32() -> tuple[Grid, torch.Tensor]:
    """The 'realistic glioma' setting: a 32^3 brain at 1 mm."""
    grid = Grid((32, 32, 32), (1.0, 1.0, 1.0))
    return grid, synthetic_brain(grid, torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Run these small-tensor tests on one thread. On a shared 2-core machine a second OpenMP
    thread that gets descheduled turns every parallel kernel into a ~5 ms wait (seen: 10 s
    instead of 50 ms); results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
