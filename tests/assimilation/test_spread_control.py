"""Inflation, RTPS and outlier rejection do what their formulas say."""

from __future__ import annotations

import pytest
import torch

from assimilation import ETKF, LETKF, Observations, Points, StochasticEnKF, inflate, rtps, spread

f64 = torch.float64


def _problem(P=2, N=20, n=8, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P, N, n, generator=g, dtype=f64) * torch.linspace(0.5, 2.0, n, dtype=f64)
    H = torch.randn(m, n, generator=g, dtype=f64)
    y = (X.mean(dim=1) @ H.T) + torch.randn(P, m, generator=g, dtype=f64)
    return X, H, Observations(y=y, r_var=torch.full((P, m), 0.5, dtype=f64))


def test_inflation_scales_spread_and_keeps_mean():
    X, _, _ = _problem()
    Xi = inflate(X, 1.3)
    assert torch.allclose(spread(Xi) / spread(X), torch.full((2,), 1.3, dtype=f64), atol=1e-12)
    assert torch.allclose(Xi.mean(1), X.mean(1), atol=1e-12)
    assert torch.allclose(Xi.std(1) / X.std(1), torch.full_like(X[:, 0], 1.3), atol=1e-12)


def test_etkf_without_observations_returns_the_inflated_prior():
    X, H, obs = _problem()
    none = Observations(y=obs.y, r_var=obs.r_var, mask=torch.zeros_like(obs.y, dtype=torch.bool))
    res = ETKF(inflation=1.1).analyse(X, none, h=lambda Z: Z @ H.T)
    assert torch.allclose(res.diagnostics.spread_analysis / res.diagnostics.spread_prior,
                          torch.full((2,), 1.1, dtype=f64), atol=1e-12)
    assert res.diagnostics.n_used.tolist() == [0, 0]


def test_prior_inflation_is_a_kalman_update_with_inflated_covariance(linear_gaussian, helpers):
    """Inflating by lambda = analysing with prior covariance lambda^2 P."""
    prob = linear_gaussian(P=1, n=5, m=3, N=50, seed=8)
    H, R = prob["H"][0], prob["R"][0]
    res = ETKF(inflation=1.2).analyse(prob["X"], Observations(y=prob["y"], r_var=torch.diagonal(R)[None]),
                                      h=lambda Z: Z @ H.T)
    x_kf, P_kf = helpers.kalman_update(prob["mean"][0], 1.44 * prob["cov"][0], H, R, prob["y"][0])
    assert float((res.X_a[0].mean(0) - torch.from_numpy(x_kf)).abs().max()) < 1e-10
    assert float((helpers.ens_cov(res.X_a)[0] - torch.from_numpy(P_kf)).abs().max()) < 1e-10


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_rtps_relaxes_each_entry_to_prior_spread(alpha):
    X, H, obs = _problem()
    plain = ETKF().analyse(X, obs, h=lambda Z: Z @ H.T).X_a
    relaxed = ETKF(rtps=alpha).analyse(X, obs, h=lambda Z: Z @ H.T).X_a
    want = (1 - alpha) * plain.std(1) + alpha * X.std(1)
    assert torch.allclose(relaxed.std(1), want, atol=1e-12)
    assert torch.allclose(relaxed.mean(1), plain.mean(1), atol=1e-12)
    # The same function on its own, and alpha = 0 is the identity.
    assert torch.allclose(rtps(X, plain, alpha), relaxed, atol=1e-12)
    assert rtps(X, plain, 0.0) is plain


def test_outlier_is_rejected_reported_and_ignored():
    X, H, obs = _problem(P=2, m=6)
    y = obs.y.clone()
    y[1, 4] += 1e3
    bad = Observations(y=y, r_var=obs.r_var)
    h = lambda Z: Z @ H.T  # noqa: E731
    for filt in (ETKF(outlier_k=4.0), LETKF(geometry=Points(torch.zeros(8, dtype=f64)), radius=1.0,
                                             outlier_k=4.0)):
        if isinstance(filt, LETKF):
            bad = Observations(y=y, r_var=obs.r_var, locations=torch.zeros(2, 6, dtype=f64))
        res = filt.analyse(X, bad, h=h)
        d = res.diagnostics
        assert d.n_rejected.tolist() == [0, 1]
        assert d.rejected.nonzero().tolist() == [[1, 4]]
        assert d.n_used.tolist() == [6, 5]
        # The innovation is reported, and the scale the gate used is sqrt(var(HX) + r).
        HX = h(X)
        assert abs(float(d.innovation[1, 4]) - float(y[1, 4] - HX[1, :, 4].mean())) < 1e-9
        scale = (HX.var(dim=1) + 0.5).sqrt()
        assert torch.allclose(d.innovation_std, scale, atol=1e-12)
        # Rejected = never assimilated: the same as masking it out.
        masked = Observations(y=y, r_var=obs.r_var, mask=~d.rejected, locations=bad.locations)
        ref = type(filt)(**{**filt.__dict__, "outlier_k": None}).analyse(X, masked, h=h)
        assert torch.allclose(res.X_a, ref.X_a, atol=1e-12)


def test_enkf_reports_rejections_too():
    X, H, obs = _problem(P=1)
    y = obs.y.clone()
    y[0, 0] -= 500.0
    res = StochasticEnKF(outlier_k=3.0).analyse(X, Observations(y=y, r_var=obs.r_var), h=lambda Z: Z @ H.T,
                                                generator=torch.Generator().manual_seed(0))
    assert res.diagnostics.n_rejected.tolist() == [1]
    assert bool(res.diagnostics.rejected[0, 0])


def test_settings_are_validated():
    with pytest.raises(ValueError):
        ETKF(inflation=0.0)
    with pytest.raises(ValueError):
        ETKF(rtps=1.5)
    with pytest.raises(ValueError):
        ETKF(outlier_k=-1.0).analyse(*_problem()[::2], HX=torch.zeros(2, 20, 6, dtype=f64))


@pytest.mark.parametrize("offset", [0.0, 1e2, 1e3])
def test_spread_is_accurate_in_float32_even_with_a_large_mean(offset):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 16, 500, generator=g, dtype=f64) * 0.01 + offset
    want = (X - X.mean(1, keepdim=True)).square().sum(1).mean(-1).div(15).sqrt()
    got = spread(X.float()).double()
    X32 = X.float().double()  # what float32 can hold of X
    want32 = (X32 - X32.mean(1, keepdim=True)).square().sum(1).mean(-1).div(15).sqrt()
    assert torch.allclose(got, want32, rtol=1e-3)
    assert torch.allclose(spread(X), want, rtol=1e-5)
