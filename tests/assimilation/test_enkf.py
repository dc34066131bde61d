"""Stochastic EnKF: exact in the mean, converging to the Kalman filter in covariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from assimilation import Observations, StochasticEnKF
from assimilation.filters import draw_perturbations


def _cov_error(helpers, prob, N: int, seeds: int, rescale: bool) -> tuple[float, float]:
    """Mean over ``seeds`` independent analyses (batched over P) of the Frobenius error of the
    analysis covariance and the max error of the analysis mean, against the Kalman filter."""
    g = torch.Generator().manual_seed(1000 + N)
    mean, cov, H, R, y = (prob[k][0] for k in ("mean", "cov", "H", "R", "y"))
    X = helpers.exact_ensemble(mean.expand(seeds, -1), cov.expand(seeds, -1, -1), N, g)
    obs = Observations(y=y.expand(seeds, -1), r_var=torch.diagonal(R).expand(seeds, -1))
    res = StochasticEnKF(rescale=rescale).analyse(X, obs, h=lambda Z: Z @ H.mT, generator=g)
    x_kf, P_kf = helpers.kalman_update(mean, cov, H, R, y)
    cov_err = torch.linalg.matrix_norm(helpers.ens_cov(res.X_a) - torch.from_numpy(P_kf)).mean()
    mean_err = (res.X_a.mean(dim=1) - torch.from_numpy(x_kf)).abs().max()
    return float(cov_err), float(mean_err)


@pytest.mark.parametrize("rescale", [False, True])
def test_enkf_converges_to_kalman_filter(linear_gaussian, helpers, rescale):
    prob = linear_gaussian(P=1, n=5, m=3, N=50, seed=7)
    err50, mean50 = _cov_error(helpers, prob, 50, seeds=64, rescale=rescale)
    err2000, mean2000 = _cov_error(helpers, prob, 2000, seeds=64, rescale=rescale)
    # Re-centred perturbations and an exact prior covariance make the mean update exact.
    assert mean50 < 1e-10 and mean2000 < 1e-10
    # Sampling error of the covariance ~ 1/sqrt(N): expected ratio sqrt(50/2000) = 0.16.
    assert err2000 / err50 < 0.25
    assert err2000 / err50 > 0.08


def _dense_enkf(X, HX, y, R, eps):
    """Textbook perturbed-observation update with dense matrices, for one problem."""
    N = X.shape[0]
    A, Y = X - X.mean(0), HX - HX.mean(0)
    K = (A.T @ Y / (N - 1)) @ torch.linalg.inv(Y.T @ Y / (N - 1) + R)
    L = torch.linalg.cholesky(R)
    E = eps @ L.T
    return X + (y + E - HX) @ K.T


@pytest.mark.parametrize("N,m", [(8, 20), (30, 6)])
@pytest.mark.parametrize("full_R", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_enkf_matches_dense_formula(linear_gaussian, N, m, full_R, rescale):
    """Both ensemble-space solves (N x N when N <= m, m x m otherwise) give the dense update."""
    prob = linear_gaussian(P=2, n=5, m=m, N=30, seed=N + m, full_R=full_R)
    g = torch.Generator().manual_seed(9)
    X = prob["X"][:, :N] + torch.randn(2, N, 5, generator=g, dtype=torch.float64)
    H, R, y = prob["H"], prob["R"], prob["y"]
    HX = X @ H.mT
    obs = Observations(y=y, R=R) if full_R else Observations(y=y, r_var=torch.diagonal(R, dim1=-2, dim2=-1))
    res = StochasticEnKF(rescale=rescale).analyse(X, obs, HX=HX, generator=torch.Generator().manual_seed(3))
    eps = draw_perturbations(torch.ones(2, m, dtype=torch.bool), N, torch.Generator().manual_seed(3), X.dtype)
    eps = eps - eps.mean(dim=1, keepdim=True)
    if rescale:
        eps = eps / eps.std(dim=1, keepdim=True)
    for p in range(2):
        ref = _dense_enkf(X[p], HX[p], y[p], R[p], eps[p])
        assert float((res.X_a[p] - ref).abs().max()) < 1e-10


def test_enkf_needs_a_generator(linear_gaussian):
    prob = linear_gaussian()
    with pytest.raises(ValueError, match="Generator"):
        StochasticEnKF().analyse(prob["X"], Observations(y=prob["y"], r_var=torch.ones(1, 3, dtype=torch.float64)),
                                 HX=prob["X"][..., :3])
