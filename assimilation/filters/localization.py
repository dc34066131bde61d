"""Gaspari-Cohn tapering and selection of the observations a local analysis uses.

Radius convention used throughout: ``radius`` is the distance at which the Gaspari-Cohn weight
reaches zero, i.e. 2c for the half-width c of Gaspari & Cohn (1999, eq. 4.10). The weight is
1 at distance 0, about 0.21 at radius / 2 (= c) and exactly 0 from ``radius`` on. (DAPPER's
``loc_rad`` is a different convention: its GC reaches zero at 2 * 1.82 * loc_rad.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compact_local", "gaspari_cohn"]


def gaspari_cohn(dist: Tensor, radius: float) -> Tensor:
    """Gaspari-Cohn 5th-order piecewise rational taper of distances ``dist`` (any shape).

    Zero at and beyond ``radius`` (= 2c); ``radius = inf`` gives weight 1 everywhere (no
    localization).
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    z = 2.0 * dist / radius
    inner = (((-0.25 * z + 0.5) * z + 0.625) * z - 5.0 / 3.0) * z * z + 1.0
    zs = torch.where(z > 0, z, torch.ones_like(z))
    outer = ((((z / 12.0 - 0.5) * z + 0.625) * z + 5.0 / 3.0) * z - 5.0) * z + 4.0 - 2.0 / (3.0 * zs)
    w = torch.where(z <= 1.0, inner, outer)
    return torch.where(z < 2.0, w, torch.zeros_like(w)).clamp_min(0.0)


def compact_local(idx: Tensor, weight: Tensor, min_weight: float) -> tuple[Tensor, Tensor]:
    """Drop candidates with weight <= min_weight and pack the rest to the front.

    idx, weight: [..., K] candidate observation indices and their localization weights.
    Returns (idx [..., K'], weight [..., K']) with K' the largest number kept by any row;
    rows with fewer keep padding of index 0 and weight 0, which contributes nothing.
    """
    keep = weight > min_weight
    counts = keep.sum(dim=-1)
    k = int(counts.max()) if counts.numel() else 0
    if k == idx.shape[-1]:
        return torch.where(keep, idx, torch.zeros_like(idx)), torch.where(keep, weight, 0.0)
    lead = idx.shape[:-1]
    K = idx.shape[-1]
    kept = keep.reshape(-1).nonzero().squeeze(-1)  # flat positions, row-major
    slot = (keep.reshape(-1, K).cumsum(dim=-1) - 1).reshape(-1).index_select(0, kept)
    dest = torch.div(kept, K, rounding_mode="floor") * k + slot
    out_idx = torch.zeros(counts.numel() * k, dtype=idx.dtype, device=idx.device)
    out_w = torch.zeros(counts.numel() * k, dtype=weight.dtype, device=weight.device)
    out_idx.index_copy_(0, dest, idx.reshape(-1).index_select(0, kept))
    out_w.index_copy_(0, dest, weight.reshape(-1).index_select(0, kept))
    return out_idx.reshape(*lead, k), out_w.reshape(*lead, k)
