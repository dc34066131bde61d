"""ETKF against the exact Kalman filter (filterpy as the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from assimilation import ETKF, Observations


def _diag_obs(prob) -> Observations:
    return Observations(y=prob["y"], r_var=torch.diagonal(prob["R"], dim1=-2, dim2=-1))


@pytest.mark.parametrize("P", [1, 4])
def test_etkf_equals_kalman_filter(linear_gaussian, helpers, P):
    prob = linear_gaussian(P=P, n=5, m=3, N=50, seed=P)
    H = prob["H"]
    res = ETKF().analyse(prob["X"], _diag_obs(prob), h=lambda X: X @ H.mT)
    mean_a = res.X_a.mean(dim=1)
    cov_a = helpers.ens_cov(res.X_a)
    for p in range(P):
        x_kf, P_kf = helpers.kalman_update(prob["mean"][p], prob["cov"][p], H[p], prob["R"][p], prob["y"][p])
        assert np.abs(mean_a[p].numpy() - x_kf).max() < 1e-4
        assert np.abs(cov_a[p].numpy() - P_kf).max() < 1e-4
        # In exact arithmetic these agree; float64 gives far more than the 1e-4 asked for.
        assert np.abs(mean_a[p].numpy() - x_kf).max() < 1e-10


def test_etkf_full_R_equals_kalman_filter(linear_gaussian, helpers):
    prob = linear_gaussian(P=3, n=5, m=4, N=40, seed=11, full_R=True)
    H = prob["H"]
    res = ETKF().analyse(prob["X"], Observations(y=prob["y"], R=prob["R"]), HX=prob["X"] @ H.mT)
    for p in range(3):
        x_kf, P_kf = helpers.kalman_update(prob["mean"][p], prob["cov"][p], H[p], prob["R"][p], prob["y"][p])
        assert np.abs(res.X_a[p].mean(0).numpy() - x_kf).max() < 1e-10
        assert np.abs(helpers.ens_cov(res.X_a)[p].numpy() - P_kf).max() < 1e-10


def test_etkf_symmetric_square_root_keeps_members_paired(linear_gaussian):
    """The symmetric transform is the one closest to the identity: with weak observations
    each analysis member stays next to its own prior member."""
    prob = linear_gaussian(P=1, n=5, m=3, N=20, seed=3)
    H = prob["H"]
    obs = Observations(y=prob["y"], r_var=torch.full((1, 3), 1e4, dtype=torch.float64))
    X_a = ETKF().analyse(prob["X"], obs, h=lambda X: X @ H.mT).X_a
    d = torch.cdist(X_a[0], prob["X"][0])
    assert torch.equal(d.argmin(dim=1), torch.arange(20))
    assert float((X_a - prob["X"]).abs().max()) < 1e-2


def test_padded_observations_are_ignored(linear_gaussian):
    prob = linear_gaussian(P=2, n=5, m=3, N=30, seed=5)
    H = prob["H"]
    HX = prob["X"] @ H.mT
    r = torch.diagonal(prob["R"], dim1=-2, dim2=-1)
    ref = ETKF().analyse(prob["X"], Observations(y=prob["y"], r_var=r), HX=HX).X_a
    # Two padded slots holding garbage, NaN included, must change nothing.
    pad = torch.tensor([[float("nan"), 1e9]] * 2, dtype=torch.float64)
    obs = Observations(
        y=torch.cat([prob["y"], pad], dim=1),
        r_var=torch.cat([r, torch.tensor([[0.0, -1.0]] * 2, dtype=torch.float64)], dim=1),
        mask=torch.tensor([[True] * 3 + [False] * 2] * 2),
    )
    HXp = torch.cat([HX, torch.full((2, 30, 2), float("nan"), dtype=torch.float64)], dim=2)
    res = ETKF().analyse(prob["X"], obs, HX=HXp)
    assert torch.allclose(res.X_a, ref, atol=1e-12, rtol=0)
    assert res.diagnostics.n_used.tolist() == [3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_followed_and_inputs_untouched(linear_gaussian, dtype):
    prob = linear_gaussian(P=2, n=5, m=3, N=16, seed=2)
    X = prob["X"].to(dtype)
    H = prob["H"].to(dtype)
    obs = Observations(y=prob["y"].to(dtype), r_var=torch.ones(2, 3, dtype=dtype))
    X_copy = X.clone()
    res = ETKF(inflation=1.1, rtps=0.3).analyse(X, obs, h=lambda Z: Z @ H.mT)
    assert res.X_a.dtype == dtype and res.X_a.shape == X.shape
    assert torch.equal(X, X_copy)
    ref = ETKF(inflation=1.1, rtps=0.3).analyse(
        prob["X"], Observations(y=prob["y"], r_var=torch.ones(2, 3, dtype=torch.float64)),
        h=lambda Z: Z @ prob["H"].mT).X_a
    assert float((res.X_a.double() - ref).abs().max()) < (1e-4 if dtype == torch.float32 else 1e-12)
