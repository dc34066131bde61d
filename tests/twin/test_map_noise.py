"""Cellularity maps with noise everywhere: the twin reads each study's noise off its own
background, so a noise floor is never assimilated as tumour burden.

Every map here is a known noise-free truth (a Gaussian tumour in a synthetic brain) plus
clamped Gaussian noise of a known offset and sd, so what the twin should recover is known.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest
import torch

from assimilation.observations import ImagingObservation
from assimilation.operators import (
    CompactImaging,
    NoiseModel,
    compact_imaging,
    density_operator,
    estimate_map_noise,
)
from assimilation.store import decode_observation, encode_observation
from assimilation.twin import _observed_density
from models.grid import Grid
from models.observables import VISIBLE_THRESHOLD
from models.tissue import synthetic_brain

T0 = datetime(2025, 3, 3, 9, tzinfo=timezone.utc)
SHAPE = (32, 32, 32)
SPACING = 2.5
VOXEL_ML = SPACING**3 / 1000.0


@pytest.fixture(scope="module")
def brain() -> torch.Tensor:
    return synthetic_brain(Grid(SHAPE, (SPACING,) * 3), torch.Generator().manual_seed(3)) > 0


def _tumour(brain: torch.Tensor, radius_vox: float = 4.0) -> torch.Tensor:
    """Noise-free density [X, Y, Z]: 0.95 exp(-r²/2r0²) where that is at least 1e-3, 0 elsewhere
    and outside the brain."""
    idx = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in SHAPE), indexing="ij"))
    r2 = ((idx - torch.tensor([16.0, 18.0, 15.0])[:, None, None, None]) ** 2).sum(0)
    u = 0.95 * torch.exp(-r2 / (2 * radius_vox**2)) * brain
    return u * (u >= 1e-3)


def _noisy(truth: torch.Tensor, brain: torch.Tensor, sd: float, offset: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((truth + offset + sd * torch.randn(truth.shape, generator=g)).clamp(0, 1) * brain).float()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sd,offset", [(0.03, 0.0), (0.05, 0.0), (0.10, 0.0), (0.15, 0.0), (0.08, 0.03)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_the_noise_of_a_map_is_read_off_its_background(brain, sd, offset, seed, with_mask):
    truth = _tumour(brain)
    noisy = _noisy(truth, brain, sd, offset, seed)
    mask = (truth >= VISIBLE_THRESHOLD) if with_mask else None
    found = estimate_map_noise(noisy, brain, mask)
    assert found is not None
    # ~13k background voxels: the two quantiles are known to ~1 %, far inside these bounds.
    assert found.sd == pytest.approx(sd, rel=0.12)
    assert found.offset == pytest.approx(offset, abs=0.25 * sd)


def test_a_noise_free_map_is_read_with_the_configured_noise(brain):
    assert estimate_map_noise(torch.zeros(SHAPE), brain) is None  # nothing but zeros
    found = estimate_map_noise(_tumour(brain), brain)
    assert found is None or found.sd < 0.01
    obs = ImagingObservation(event_id="e", patient_id="p", time=T0, spacing_mm=(SPACING,) * 3, density=_tumour(brain))
    configured = NoiseModel(density_sd=0.05)
    assert compact_imaging(obs, brain, noise=configured).noise_model(configured).density_sd == 0.05


@pytest.mark.parametrize("radius_vox", [2.5, 4.0])
@pytest.mark.parametrize("sd", [0.05, 0.10, 0.15])
def test_the_initial_density_holds_the_true_burden_not_the_noise_floor(brain, sd, radius_vox):
    # A map whose noise is 2-3 times what the twin is configured for: read with the configured
    # model alone, thousands of background voxels would pass the thresholds as tumour.
    truth = _tumour(brain, radius_vox)
    noisy = _noisy(truth, brain, sd, 0.0, seed=5)
    obs = ImagingObservation(event_id="e", patient_id="p", time=T0, spacing_mm=(SPACING,) * 3, density=noisy)
    d = _observed_density(obs, brain, torch.float32, NoiseModel(density_sd=0.05))
    true_burden = float(truth.sum()) * VOXEL_ML
    assert float(d.sum()) * VOXEL_ML == pytest.approx(true_burden, rel=0.25)
    # nothing far from the tumour survives the denoising
    far = _tumour(brain, radius_vox=5.0) == 0
    assert float(d[far & brain].sum()) * VOXEL_ML < 0.05 * true_burden


@pytest.mark.parametrize("sd", [0.05, 0.12])
def test_compaction_selects_the_tumour_not_the_noise_and_counts_its_volume(brain, sd):
    truth = _tumour(brain)
    noisy = _noisy(truth, brain, sd, 0.0, seed=9)
    obs = ImagingObservation(event_id="e", patient_id="p", time=T0, spacing_mm=(SPACING,) * 3, density=noisy)
    c = compact_imaging(obs, brain)
    assert c.channel == "density" and c.noise_sd == pytest.approx(sd, rel=0.12)
    true_volume = float((truth >= VISIBLE_THRESHOLD).sum()) * VOXEL_ML
    assert c.tumor_volume_ml == pytest.approx(true_volume, rel=0.3)
    # The selection: the tumour with its margin, plus the background lattice (every 3rd voxel).
    n_brain = int(brain.sum())
    n_tumour = int((truth >= 0.02).sum())
    assert c.index.numel() <= 2 * n_tumour + n_brain // 27 + 50
    # The study's noise model is what its analysis uses (the configured sd is a floor).
    noise = c.noise_model(NoiseModel(density_sd=0.05))
    assert noise.density_sd == pytest.approx(max(0.05, c.noise_sd))


def test_the_density_operator_predicts_the_mean_of_an_offset_clamped_map():
    u = torch.tensor([0.0, 0.05, 0.3, 0.98])
    noise = NoiseModel(density_sd=0.1, density_offset=0.03)
    block = density_operator(u.view(1, 1, 1, 1, 4), torch.arange(4)[None], torch.zeros(1, 4), noise)
    g = torch.Generator().manual_seed(1)
    draws = (u[None].double() + 0.03 + 0.1 * torch.randn(400_000, 4, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert block.HX[0, 0] == pytest.approx(draws.mean(0).float(), abs=1e-3)


def test_a_study_keeps_its_noise_estimate_through_the_journal(brain):
    noisy = _noisy(_tumour(brain), brain, 0.1, 0.0, seed=2)
    obs = ImagingObservation(event_id="e", patient_id="p", time=T0, spacing_mm=(SPACING,) * 3, density=noisy)
    c = compact_imaging(obs, brain)
    back = decode_observation(encode_observation(c))
    assert isinstance(back, CompactImaging)
    assert (back.noise_sd, back.noise_offset) == (c.noise_sd, c.noise_offset)
    assert math.isfinite(back.noise_sd)
