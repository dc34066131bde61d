"""The voxel grid the tumour lives on, and fields defined on it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .device import DEFAULT_DTYPE


@dataclass(frozen=True)
class Grid:
    """A regular 3-D voxel grid.

    ``shape`` is (X, Y, Z) in voxels; ``spacing`` is the voxel size (hx, hy, hz) in mm and may
    be anisotropic (typical MR: 1 x 1 x 3 mm). Voxel (i, j, k) has its centre at
    ((i + 1/2) hx, (j + 1/2) hy, (k + 1/2) hz) mm, so the grid covers [0, X hx] x ... mm.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) < 1 for n in self.shape):
            raise ValueError(f"shape must be 3 positive ints, got {self.shape}")
        if len(self.spacing) != 3 or any(not (float(h) > 0.0) for h in self.spacing):
            raise ValueError(f"spacing must be 3 positive mm values, got {self.spacing}")
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "spacing", tuple(float(h) for h in self.spacing))

    @property
    def n_voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def voxel_volume_mm3(self) -> float:
        return math.prod(self.spacing)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (1 mL = 1000 mm^3)."""
        return self.voxel_volume_mm3 / 1000.0

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Side lengths of the grid box in mm."""
        return tuple(n * h for n, h in zip(self.shape, self.spacing))  # type: ignore[return-value]

    @property
    def center_mm(self) -> tuple[float, float, float]:
        """Centre of the grid box in mm (same frame as ``coords``)."""
        return tuple(0.5 * e for e in self.extent_mm)  # type: ignore[return-value]

    def coords(self, device: torch.device | str | None = None,
               dtype: torch.dtype = DEFAULT_DTYPE) -> Tensor:
        """Voxel-centre coordinates in mm, shape [X, Y, Z, 3]."""
        axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) * h
                for n, h in zip(self.shape, self.spacing)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def gaussian_blob(grid: Grid, center_mm: Tensor, sigma_mm: Tensor, peak: Tensor | float = 1.0,
                  ) -> Tensor:
    """Gaussian seed densities ``peak * exp(-|x - c|^2 / (2 sigma^2))``, shape [B, X, Y, Z].

    ``center_mm`` [B, 3] mm, ``sigma_mm`` [B] mm, ``peak`` [B] or a float (fraction of carrying
    capacity). Device and dtype follow ``center_mm``. A convenient initial tumour ``u0``.
    """
    center_mm = torch.as_tensor(center_mm)
    if center_mm.ndim == 1:
        center_mm = center_mm.unsqueeze(0)
    dtype = center_mm.dtype if center_mm.is_floating_point() else DEFAULT_DTYPE
    center_mm = center_mm.to(dtype)
    device = center_mm.device
    b = center_mm.shape[0]
    sigma = torch.as_tensor(sigma_mm, device=device, dtype=dtype).reshape(-1).expand(b)
    pk = torch.as_tensor(peak, device=device, dtype=dtype).reshape(-1).expand(b)
    # Separable: one 1-D Gaussian per axis, multiplied by broadcasting (no [B,X,Y,Z,3] temporary).
    out = pk.view(b, 1, 1, 1)
    for axis, (n, h) in enumerate(zip(grid.shape, grid.spacing)):
        x = (torch.arange(n, device=device, dtype=dtype) + 0.5) * h
        g = torch.exp(-0.5 * ((x[None, :] - center_mm[:, axis:axis + 1]) / sigma[:, None]) ** 2)
        view = [b, 1, 1, 1]
        view[axis + 1] = n
        out = out * g.view(view)
    return out.contiguous()
