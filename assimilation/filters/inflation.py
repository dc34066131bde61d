"""Spread control: multiplicative prior inflation and relaxation to prior spread (RTPS).

Both act on ensembles [P, N, n] around the member mean and leave the mean unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inflate", "rtps", "spread"]


def spread(X: Tensor) -> Tensor:
    """[P, N, n] -> [P]: sqrt of the mean over entries of the (N - 1)-normalized member variance.

    Computed from two fused reductions, sum x^2 - (sum over members x)^2 / N, which read the
    ensemble once and allocate nothing of its size. That shortcut cancels when the mean is large
    against the spread (it loses about log10(sum x^2 / sum of squared deviations) digits), so
    where that ratio exceeds 1e-3 / eps (about 1e4 in float32) the deviations are summed
    explicitly; the result is accurate to about 1e-3 relative or better, ample for a diagnostic.
    """
    N, n = X.shape[-2], X.shape[-1]
    total = torch.linalg.vector_norm(X, dim=(-2, -1)).square()
    centre = X.sum(dim=-2).square().sum(dim=-1) / N
    dev = total - centre
    if bool((dev <= total * (torch.finfo(X.dtype).eps * 1e3)).any()):
        A = X - X.mean(dim=-2, keepdim=True)
        dev = A.square().sum(dim=(-2, -1))
    return (dev.clamp_min(0.0) / (n * (N - 1))).sqrt()


def inflate(X: Tensor, factor: float) -> Tensor:
    """Multiply the anomalies of ``X`` [P, N, n] by ``factor`` (the covariance by factor**2)."""
    if factor == 1.0:
        return X
    mean = X.mean(dim=-2, keepdim=True)
    return mean + factor * (X - mean)


def rtps(X_prior: Tensor, X_a: Tensor, alpha: float) -> Tensor:
    """Relaxation to prior spread (Whitaker & Hamill 2012), per state entry.

    sigma_new = (1 - alpha) * sigma_a + alpha * sigma_b, obtained by scaling the analysis
    anomalies of each entry by 1 + alpha * (sigma_b - sigma_a) / sigma_a. X_prior, X_a:
    [P, N, n]; entries whose analysis spread is zero are left as they are (nothing to scale).
    """
    if alpha == 0.0:
        return X_a
    sigma_b = X_prior.std(dim=-2, correction=1, keepdim=True)
    sigma_a = X_a.std(dim=-2, correction=1, keepdim=True)
    positive = sigma_a > 0
    scale = torch.where(
        positive,
        1.0 + alpha * (sigma_b - sigma_a) / torch.where(positive, sigma_a, torch.ones_like(sigma_a)),
        torch.ones_like(sigma_a),
    )
    mean = X_a.mean(dim=-2, keepdim=True)
    return mean + scale * (X_a - mean)
