"""Shared problem builders for the EnKF-family tests (all small: the fast tests run in seconds)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor


def exact_ensemble(mean: Tensor, cov: Tensor, N: int, gen: torch.Generator) -> Tensor:
    """[P, N, n] ensemble whose sample mean and (N-1)-normalized covariance are exactly mean
    [P, n] and cov [P, n, n]: centred orthonormal columns scaled by the Cholesky factor."""
    P, n = mean.shape
    Z = torch.randn(P, N, n, generator=gen, dtype=mean.dtype)
    Q, _ = torch.linalg.qr(Z - Z.mean(dim=1, keepdim=True))
    L = torch.linalg.cholesky(cov)
    return mean[:, None, :] + (N - 1) ** 0.5 * Q @ L.mT


def random_spd(P: int, n: int, gen: torch.Generator, dtype=torch.float64) -> Tensor:
    B = torch.randn(P, n, n, generator=gen, dtype=dtype)
    return B @ B.mT / n + 0.5 * torch.eye(n, dtype=dtype)


def kalman_update(x: Tensor, Pm: Tensor, H: Tensor, R: Tensor, y: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """filterpy's KalmanFilter.update for one problem (the test oracle)."""
    from filterpy.kalman import KalmanFilter

    n, m = x.shape[0], y.shape[0]
    kf = KalmanFilter(dim_x=n, dim_z=m)
    kf.x = x.numpy().reshape(n, 1).copy()
    kf.P = Pm.numpy().copy()
    kf.H = H.numpy().copy()
    kf.R = R.numpy().copy()
    kf.update(y.numpy().reshape(m, 1))
    return kf.x.ravel(), kf.P


@pytest.fixture
def linear_gaussian() -> Callable[..., dict[str, Tensor]]:
    """Builder of P random linear-Gaussian problems (n state, m obs, N members, float64)."""

    def build(P: int = 1, n: int = 5, m: int = 3, N: int = 50, seed: int = 0, full_R: bool = False):
        g = torch.Generator().manual_seed(seed)
        mean = torch.randn(P, n, generator=g, dtype=torch.float64)
        cov = random_spd(P, n, g)
        H = torch.randn(P, m, n, generator=g, dtype=torch.float64)
        R = random_spd(P, m, g) if full_R else torch.diag_embed(
            0.2 + torch.rand(P, m, generator=g, dtype=torch.float64))
        y = torch.randn(P, m, generator=g, dtype=torch.float64)
        X = exact_ensemble(mean, cov, N, g)
        return {"mean": mean, "cov": cov, "H": H, "R": R, "y": y, "X": X}

    return build


def ens_cov(X: Tensor) -> Tensor:
    A = X - X.mean(dim=1, keepdim=True)
    return A.mT @ A / (X.shape[1] - 1)


def smooth_field(shape: tuple[int, ...], count: int, gen: torch.Generator, length: float = 3.0,
                 dtype=torch.float64) -> Tensor:
    """[count, *shape] smooth Gaussian random fields (white noise filtered by a Gaussian in
    Fourier space, periodic), unit variance per voxel."""
    white = torch.randn(count, *shape, generator=gen, dtype=dtype)
    freqs = torch.meshgrid(*[torch.fft.fftfreq(s, dtype=dtype) for s in shape], indexing="ij")
    k2 = sum(f.square() for f in freqs)
    kernel = torch.exp(-2.0 * (torch.pi * length) ** 2 * k2)
    dims = tuple(range(1, len(shape) + 1))
    field = torch.fft.ifftn(torch.fft.fftn(white, dim=dims) * kernel, dim=dims).real
    return field / field.std()


@pytest.fixture
def helpers():
    class H:
        exact_ensemble = staticmethod(exact_ensemble)
        kalman_update = staticmethod(kalman_update)
        ens_cov = staticmethod(ens_cov)
        smooth_field = staticmethod(smooth_field)
        random_spd = staticmethod(random_spd)

    return H
