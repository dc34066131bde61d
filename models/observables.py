"""What can be measured of a simulated tumour: burden, visible volume, marker and ctDNA levels.

Pure maps from the density field (or burden) to observable quantities; noise models live with the
observation operators in assimilation/ and in the virtual-patient generator.
"""

from __future__ import annotations

import torch

# T2/FLAIR visibility threshold as a fraction of carrying capacity (Swanson et al.).
VISIBLE_THRESHOLD = 0.16


def tumor_burden(u: torch.Tensor, voxel_ml: float) -> torch.Tensor:
    """Total tumour cells in mL at carrying capacity: Σ u·dV. u [B, X, Y, Z] -> [B]."""
    return u.flatten(1).sum(dim=1) * voxel_ml


def tumor_volume(u: torch.Tensor, voxel_ml: float, threshold: float = VISIBLE_THRESHOLD) -> torch.Tensor:
    """Visible tumour volume in mL: voxels with u ≥ threshold. u [B, X, Y, Z] -> [B]."""
    return (u >= threshold).flatten(1).sum(dim=1).to(u.dtype) * voxel_ml


def soft_segmentation(u: torch.Tensor, threshold: float = VISIBLE_THRESHOLD, width: float = 0.03) -> torch.Tensor:
    """Smooth indicator of visibility, sigmoid((u − threshold)/width), same shape as u."""
    return torch.sigmoid((u - threshold) / width)


def marker_level(burden: torch.Tensor, shedding: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Serum marker level: baseline + shedding·burden (units of the marker; burden in mL)."""
    return baseline + shedding * burden


def ctdna_fraction(burden: torch.Tensor, shedding: torch.Tensor) -> torch.Tensor:
    """ctDNA tumour fraction in [0, 1): s·B / (1 + s·B), burden in mL, s in 1/mL."""
    sb = shedding * burden
    return sb / (1.0 + sb)


def center_of_mass(u: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Density-weighted centroid in mm. u [B, X, Y, Z], coords [X, Y, Z, 3] -> [B, 3]."""
    w = u.flatten(1)
    total = w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(u.dtype).tiny)
    return (w @ coords.reshape(-1, 3).to(u.dtype)) / total
