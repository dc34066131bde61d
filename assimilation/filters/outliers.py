"""Observation quality control by the innovation (background) check."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["innovation_gate"]


def innovation_gate(
    innovation: Tensor, var_hx: Tensor, r_var: Tensor, valid: Tensor, k: float | None
) -> tuple[Tensor, Tensor]:
    """Reject observations that disagree with the prior by more than ``k`` standard deviations.

    An observation is rejected when |y - mean(HX)| > k * sqrt(var(HX) + r): the innovation's
    expected spread under the prior and the observation error. All inputs are [P, m]; ``valid``
    marks real observations. Returns (rejected [P, m] bool, scale sqrt(var(HX) + r) [P, m]).
    ``k = None`` disables the gate.
    """
    scale = (var_hx + r_var).sqrt()
    if k is None:
        return torch.zeros_like(valid), scale
    if k <= 0:
        raise ValueError(f"outlier_k must be positive, got {k}")
    return valid & (innovation.abs() > k * scale), scale
