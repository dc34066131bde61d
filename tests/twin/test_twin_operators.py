"""Observation operators: their predictions against closed forms or Monte Carlo, and the voxel
selection's guarantees (deterministic, capped, covers the tumour, stays in the brain)."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

from assimilation.observations import ImagingObservation
from assimilation.operators import (
    NoiseModel,
    VoxelSelection,
    compact_imaging,
    concat_blocks,
    ctdna_operator,
    density_operator,
    density_sum_operator,
    marker_operator,
    select_voxels,
    volume_operator,
)
from models.observables import VISIBLE_THRESHOLD

T0 = datetime(2025, 3, 3, 9, tzinfo=timezone.utc)


def test_density_operator_is_the_mean_of_the_clamped_noisy_map():
    # The virtual scanner reports clamp(u + e, 0, 1): at u = 0 that averages sd/sqrt(2 pi),
    # not 0. The operator must predict that mean, or background voxels read as tumour.
    u = torch.tensor([0.0, 0.02, 0.1, 0.5, 0.97, 1.0])
    sd = 0.05
    block = density_operator(u.view(1, 1, 1, 1, 6), torch.arange(6)[None], torch.zeros(1, 6), NoiseModel(density_sd=sd))
    g = torch.Generator().manual_seed(0)
    draws = (u[None].double() + sd * torch.randn(400_000, 6, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert block.HX[0, 0] == pytest.approx(draws.mean(0).float(), abs=5e-4)
    assert float(block.HX[0, 0, 0]) == pytest.approx(sd / math.sqrt(2 * math.pi), rel=1e-4)
    assert block.r_var.eq(sd**2).all()
    # locations: flat index -> (i, j, k) on a [1, 1, 6] grid
    assert block.locations[0, :, 2].tolist() == list(range(6))


def test_density_sum_is_the_burden_the_map_shows():
    u = torch.zeros(1, 3, 4, 4, 4)
    u[:, :, 1, 1, 1] = torch.tensor([0.2, 0.5, 0.8])
    index = torch.arange(64)[None]
    values = torch.zeros(1, 64)
    values[0, 21] = 0.5  # voxel (1, 1, 1)
    block = density_sum_operator(u, index, values, voxel_ml=0.125, noise=NoiseModel(density_sd=0.0))
    assert block.y.item() == pytest.approx(0.0625)
    assert block.HX[0, :, 0].tolist() == pytest.approx([0.025, 0.0625, 0.1])


def test_marker_and_ctdna_operators_follow_the_shedding_laws():
    u = torch.zeros(1, 2, 2, 2, 2)
    u[0, 0] = 0.5  # burden 8 voxels * 0.5 * 0.125 mL = 0.5 mL
    u[0, 1] = 1.0  # 1 mL
    log_s = torch.log(torch.tensor([[4.0, 4.0]]))
    m = marker_operator(u, log_s, torch.tensor([200.0]), 180.0, 0.125)
    assert m.HX[0, :, 0].tolist() == pytest.approx([math.log(182.0), math.log(184.0)])
    assert m.y.item() == pytest.approx(math.log(200.0)) and m.r_var.item() == pytest.approx(0.01)
    c = ctdna_operator(u, torch.log(torch.tensor([[2e-3, 2e-3]])), torch.tensor([1e-3]), 0.125)
    assert c.HX[0, :, 0].tolist() == pytest.approx([math.log(1e-3 / 1.001), math.log(2e-3 / 1.002)], rel=1e-5)
    # Censoring at the limit of detection: a tiny tumour and a sub-LOD report agree at log(LOD).
    tiny = torch.full((1, 1, 2, 2, 2), 1e-6)
    c = ctdna_operator(tiny, torch.log(torch.tensor([[2e-3]])), torch.tensor([0.0]), 0.125, NoiseModel(ctdna_lod=1e-4))
    assert c.HX.item() == pytest.approx(math.log(1e-4)) and c.y.item() == pytest.approx(math.log(1e-4))


def test_volume_operator_counts_visible_voxels_softly():
    u = torch.zeros(1, 1, 4, 4, 4)
    u[0, 0, :2] = 0.9  # 32 voxels well above the threshold
    block = volume_operator(u, torch.tensor([4.0]), voxel_ml=0.125)
    assert block.HX.item() == pytest.approx(4.0, rel=1e-3)
    # empty voxels add nothing, however many (a raw sigmoid would add 0.005 voxel each)
    empty = volume_operator(torch.zeros(1, 1, 64, 64, 64), torch.tensor([0.0]), voxel_ml=0.125)
    assert empty.HX.item() == 0.0
    assert block.r_var.item() == pytest.approx((0.1 * 4.0) ** 2 + 0.5**2)


def test_voxel_selection_is_deterministic_capped_and_covers_the_tumour():
    g = torch.Generator().manual_seed(3)
    shape = (16, 16, 16)
    brain = torch.zeros(shape, dtype=torch.bool)
    brain[2:14, 2:14, 2:14] = True
    truth = torch.zeros(shape)
    truth[6:9, 6:9, 6:9] = 0.8
    density = ((truth + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1) * brain)
    sel = VoxelSelection(max_obs=1024)
    index = select_voxels(density, brain, sel)
    assert torch.equal(index, select_voxels(density.clone(), brain, sel))
    chosen = torch.zeros(16**3, dtype=torch.bool)
    chosen[index] = True
    chosen = chosen.view(shape)
    assert bool(chosen[truth > 0].all()), "every tumour voxel is observed"
    assert bool(chosen[5:10, 5:10, 5:10][brain[5:10, 5:10, 5:10]].all()), "and its rim"
    assert not bool(chosen[~brain].any())
    # noise alone does not flood the selection: the tumour, one voxel of smoothing and one of
    # margin around it (7³), and the background lattice of every third voxel (4³ in the brain)
    assert index.numel() <= 7**3 + 4**3
    capped = select_voxels(density, brain, VoxelSelection(max_obs=100))
    assert capped.numel() == 100 and len(set(capped.tolist())) == 100


def test_compact_imaging_prefers_the_density_map_and_keeps_the_volume():
    shape = (8, 8, 8)
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[1:7, 1:7, 1:7] = 2
    density = np.zeros(shape, dtype=np.float32)
    density[3:5, 3:5, 3:5] = 0.9
    obs = ImagingObservation(event_id="e1", patient_id="p", time=T0, spacing_mm=(5.0, 5.0, 5.0), density=density,
                             segmentation=(density >= VISIBLE_THRESHOLD).astype(np.uint8), tissue=tissue)
    c = compact_imaging(obs, torch.as_tensor(tissue) > 0)
    assert c.channel == "density"
    assert c.tumor_volume_ml == pytest.approx(8 * 0.125)
    assert torch.equal(c.values, torch.as_tensor(density).flatten()[c.index])
    seg_only = ImagingObservation(event_id="e2", patient_id="p", time=T0, spacing_mm=(5.0, 5.0, 5.0),
                                  segmentation=(density > 0).astype(np.uint8))
    c2 = compact_imaging(seg_only, torch.as_tensor(tissue) > 0)
    assert c2.channel == "segmentation" and c2.values.sum() == 8
    with pytest.raises(ValueError, match="grid"):
        compact_imaging(obs, torch.ones(4, 4, 4, dtype=torch.bool))


def test_concat_blocks_marks_non_spatial_observations():
    u = torch.rand(1, 2, 2, 2, 2)
    a = density_operator(u, torch.tensor([[0, 7]]), torch.zeros(1, 2))
    b = marker_operator(u, torch.zeros(1, 2), torch.tensor([190.0]), 180.0, 0.125)
    block = concat_blocks([a, b])
    assert block.HX.shape == (1, 2, 3) and block.y.shape == (1, 3)
    assert torch.isnan(block.locations[0, 2]).all() and not torch.isnan(block.locations[0, :2]).any()


def test_profile_operator_averages_shells_around_the_study_centre():
    # A radial field on a 12³ grid of 2 mm: every shell holds voxels at one distance band, the
    # rows are averages (sum to 1), y is the shell mean of the study, HX that of E[clamp(u + e)].
    from assimilation.operators import profile_operator, shell_weights

    shape, h = (12, 12, 12), 2.0
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"), -1)
    r = ((idx - 5.5) * h).norm(dim=-1)
    u = torch.sigmoid((6.0 - r) / 1.5)
    index = torch.arange(u.numel())[None]
    values = u.flatten()[None]
    W = shell_weights(index, values, shape, (h, h, h), 6, h, 0.05)
    assert W.shape == (1, 6, u.numel())
    nonempty = W.sum(-1) > 0
    assert torch.allclose(W.sum(-1)[nonempty], torch.ones(()).double())
    noise = NoiseModel()
    block = profile_operator(u[None, None], index, values, (h, h, h), noise, n_shells=6)
    assert block.HX.shape == (1, 1, 6) and block.y.shape == (1, 6)
    expected = (W.float() @ values[0])[0]
    assert torch.allclose(block.y[0], expected, atol=1e-6)
    # Monotone profile: the shells' means fall from the centre outwards.
    assert bool((block.y[0, nonempty[0]].diff() < 0).all())
    # HX of the noiseless truth matches y up to the clamp's bias (below 0.02).
    assert (block.HX[0, 0] - block.y[0]).abs().max() < 0.021
    n = W[0].gt(0).sum(-1).float()
    assert torch.allclose(block.r_var[0][nonempty[0]], (noise.density_sd ** 2 / n + noise.profile_sd ** 2)[nonempty[0]])
