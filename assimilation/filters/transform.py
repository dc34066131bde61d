"""Ensemble-space algebra shared by the ETKF, LETKF and EnKF.

In ensemble space an analysis is X_a[j] = mean + sum_i T[i, j] A[i]: the (inflated) prior
anomalies A [N, n] recombined by a transform T [N, N]. Working in the N x N space keeps the cost
linear in the state size n and in the number of observations m. ``member_operator`` folds the
mean, the anomalies and the inflation into one matrix M with X_a = M X, so the state-space work
of an update is a single batched product with the prior as passed in.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["etkf_transform", "member_operator"]


def etkf_transform(Yw: Tensor, dw: Tensor) -> Tensor:
    """ETKF transform from whitened anomalies Yw [..., N, k] and innovations dw [..., k].

    C = (N - 1) I + Yw Yw^T (symmetric positive definite, eigenvalues >= N - 1), C = V L V^T;
    mean weights w = C^-1 Yw dw and the symmetric square root W = V sqrt((N - 1) / L) V^T, the
    one closest to the identity, which keeps the analysis anomalies centred and the members
    paired with their priors. Returns T = W + w 1^T, shape [..., N, N]. Any leading axes are
    batched, which is how the LETKF runs all of its local analyses in one call.
    """
    N = Yw.shape[-2]
    C = Yw @ Yw.mT
    C.diagonal(dim1=-2, dim2=-1).add_(N - 1)
    lam, V = torch.linalg.eigh(C)
    b = V.mT @ (Yw @ dw[..., None])  # [..., N, 1]
    w_mean = V @ (b / lam[..., None])
    W = (V * ((N - 1) / lam).sqrt()[..., None, :]) @ V.mT
    return W + w_mean


def member_operator(T: Tensor, inflation: float = 1.0) -> Tensor:
    """M [..., N, N] with X_a = M X for X_a = mean + T^T (inflation * (X - mean)).

    M = 1 1^T / N + inflation * T^T (I - 1 1^T / N). Its rows sum to one, so the mean is carried
    through X itself and the result is as accurate as storing X_a in X's precision allows.
    """
    N = T.shape[-1]
    Tt = T.mT
    return inflation * (Tt - Tt.sum(dim=-1, keepdim=True) / N) + 1.0 / N
