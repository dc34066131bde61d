"""Tissue maps: labels, their diffusion weights, and a synthetic brain for tests and benchmarks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .device import DEFAULT_DTYPE
from .grid import Grid

OUTSIDE: int = 0  # CSF, ventricles, skull, air: no tumour cells, no flux across its border
GRAY: int = 1
WHITE: int = 2

#: Diffusivity relative to white matter. Glioma cells migrate along white-matter tracts about
#: five times faster than through gray matter (Swanson et al. 2000: D_white ~ 5 D_gray).
TISSUE_WEIGHT: dict[int, float] = {OUTSIDE: 0.0, GRAY: 0.2, WHITE: 1.0}


def diffusion_weight(labels: Tensor, dtype: torch.dtype = DEFAULT_DTYPE) -> Tensor:
    """Map tissue labels (any integer shape) to D(x)/D_white, same shape, on the labels' device.

    Unknown labels raise: a silently wrong tissue map would give a silently wrong forecast.
    """
    labels = torch.as_tensor(labels)
    n = max(TISSUE_WEIGHT) + 1
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise ValueError(f"tissue labels must be in {sorted(TISSUE_WEIGHT)}")
    table = torch.zeros(n, dtype=dtype, device=labels.device)
    for label, w in TISSUE_WEIGHT.items():
        table[label] = w
    return table[labels.long()]


def _smooth_noise(shape: tuple[int, int, int], generator: torch.Generator, coarse: int = 5) -> Tensor:
    """A smooth random field of unit-ish amplitude: coarse Gaussian noise, trilinearly upsampled."""
    noise = torch.randn((1, 1, coarse, coarse, coarse), generator=generator,
                        device=generator.device, dtype=torch.float64)
    return F.interpolate(noise, size=shape, mode="trilinear", align_corners=True)[0, 0]


def synthetic_brain(grid: Grid, generator: torch.Generator,
                    device: torch.device | str | None = None) -> Tensor:
    """A brain-like label map, LongTensor [X, Y, Z] with values OUTSIDE / GRAY / WHITE.

    An ellipsoid filling ~90 % of the box (x = left-right, y = back-front, z = foot-head) whose
    surface is folded by sulci (random directions and wavelengths) and split on top by an
    interhemispheric fissure; a gray-matter cortex ribbon lines every outer surface, sulci and
    fissure included; white matter inside; deep gray nuclei; two lateral ventricles (OUTSIDE:
    an interior no-flux boundary); a smooth random wobble of every surface. Every random number
    comes from ``generator`` in a fixed order, so a seed gives the same brain on any machine.
    The ribbon is ~5 % of the smallest semi-axis thick, and at least one voxel.
    """
    shape = grid.shape
    dt = torch.float64
    gdev = generator.device
    semi = torch.tensor([0.45 * e for e in grid.extent_mm], dtype=dt, device=gdev)
    center = torch.tensor(grid.center_mm, dtype=dt, device=gdev)
    x = grid.coords(device=gdev, dtype=dt)
    q = (x - center) / semi                                            # ellipsoid at |q| = 1
    r = q.norm(dim=-1)
    v = q / r.clamp_min(1e-9).unsqueeze(-1)                            # direction from the centre

    wobble = _smooth_noise(shape, generator)
    wobble_v = _smooth_noise(shape, generator)

    # Sulci: a sum of random plane waves over the direction sphere; where it is positive the
    # surface is pushed inwards.
    n_waves = 6
    dirs = torch.randn((n_waves, 3), generator=generator, device=gdev, dtype=dt)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    freq = 8.0 + 6.0 * torch.rand((n_waves,), generator=generator, device=gdev, dtype=dt)
    phase = 2.0 * math.pi * torch.rand((n_waves,), generator=generator, device=gdev, dtype=dt)
    fold = torch.cos((v @ dirs.T) * freq + phase).sum(-1) / math.sqrt(n_waves)

    brain = r * (1.0 + 0.04 * wobble) + 0.15 * fold.clamp_min(0.0) < 1.0
    gap = max(1.0, 0.6 * grid.spacing[0])                              # mm, half-width
    brain &= ~(((x[..., 0] - center[0]).abs() < gap) & (q[..., 2] > 0.35 + 0.05 * wobble))

    # Cortex = brain within a few voxels of the exterior (a max-pool dilation of it); the pool
    # pads with -inf, so the box edge is not mistaken for exterior.
    a_min = float(semi[semi > 0].min())
    k = [max(1, round(0.05 * a_min / h)) for h in grid.spacing]
    exterior = (~brain).to(dt)[None, None]
    near = F.max_pool3d(exterior, kernel_size=[2 * kk + 1 for kk in k], stride=1, padding=k)
    near = near[0, 0] > 0.5

    labels = torch.full(shape, OUTSIDE, dtype=torch.long, device=gdev)
    labels[brain] = WHITE
    labels[brain & near] = GRAY
    for side in (-1.0, 1.0):
        d_nuc = ((q[..., 0] - side * 0.28) / 0.14) ** 2 + (q[..., 1] / 0.2) ** 2 + \
                ((q[..., 2] + 0.1) / 0.14) ** 2
        labels[(d_nuc < 1.0) & brain] = GRAY
        d_ven = ((q[..., 0] - side * 0.12) / 0.07) ** 2 + ((q[..., 1] - 0.02) / 0.35) ** 2 + \
                ((q[..., 2] - 0.08) / 0.13) ** 2
        labels[d_ven * (1.0 + 0.15 * wobble_v) < 1.0] = OUTSIDE

    target = torch.device(device) if device is not None else gdev
    return labels.to(target)
