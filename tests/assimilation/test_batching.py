"""One batched call over P patients equals P separate calls (padding, per-patient generators)."""

from __future__ import annotations

import torch

from assimilation import ETKF, LETKF, Observations, Points, StochasticEnKF, VoxelGrid

f64 = torch.float64


def _patients(P=4, N=12, n=30, seed=0):
    """Patients with different numbers of observations (direct observations of some entries)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P, N, n, generator=g, dtype=f64).cumsum(-1) * 0.3
    picks = [torch.randperm(n, generator=g)[: 5 + 6 * p] for p in range(P)]
    ys = [X[p].mean(0)[i] + torch.randn(len(i), generator=g, dtype=f64) for p, i in enumerate(picks)]
    rs = [0.3 + torch.rand(len(i), generator=g, dtype=f64) for i in picks]
    locs = [i.to(f64) for i in picks]
    return X, picks, ys, rs, locs


def _hx(X, picks, m):
    HX = torch.zeros(X.shape[0], X.shape[1], m, dtype=X.dtype)
    for p, i in enumerate(picks):
        HX[p, :, : len(i)] = X[p][:, i]
    return HX


def test_batched_equals_one_by_one():
    X, picks, ys, rs, locs = _patients()
    obs = Observations.pad(ys, rs, locs)
    HX = _hx(X, picks, obs.n_obs)
    geo = Points(torch.arange(30, dtype=f64), period=30.0)
    filters = [
        ETKF(inflation=1.05, rtps=0.2, outlier_k=3.0),
        LETKF(geometry=geo, radius=6.0, inflation=1.05, rtps=0.2, outlier_k=3.0),
        StochasticEnKF(inflation=1.05, rescale=True),
    ]
    for filt in filters:
        gens = [torch.Generator().manual_seed(100 + p) for p in range(4)]
        batched = filt.analyse(X, obs, HX=HX, generator=gens)
        for p in range(4):
            one = Observations(y=ys[p][None], r_var=rs[p][None], locations=locs[p][None])
            single = filt.analyse(X[p : p + 1], one, HX=X[p : p + 1][..., picks[p]],
                                  generator=[torch.Generator().manual_seed(100 + p)])
            m = len(picks[p])
            assert float((batched.X_a[p] - single.X_a[0]).abs().max()) < 1e-10, type(filt).__name__
            d, s = batched.diagnostics, single.diagnostics
            assert torch.allclose(d.innovation[p, :m], s.innovation[0], atol=1e-12)
            assert int(d.n_rejected[p]) == int(s.n_rejected[0])
            assert abs(float(d.spread_analysis[p] - s.spread_analysis[0])) < 1e-10


def test_voxel_letkf_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(5)
    grid = VoxelGrid((8, 8, 8), block=4, n_extra=2)
    P, N = 3, 10
    X = torch.randn(P, N, grid.n_state, generator=g, dtype=f64)
    vox = [torch.randperm(512, generator=g)[: 20 + 30 * p] for p in range(P)]
    coords = [torch.stack([v // 64, (v // 8) % 8, v % 8], dim=-1).to(f64) for v in vox]
    ys = [torch.randn(len(v), generator=g, dtype=f64) for v in vox]
    rs = [torch.ones(len(v), dtype=f64) for v in vox]
    obs = Observations.pad(ys, rs, coords)
    HX = _hx(X, vox, obs.n_obs)
    filt = LETKF(geometry=grid, radius=3.5, extra_obs_weight=0.1, chunk=3)
    batched = filt.analyse(X, obs, HX=HX).X_a
    for p in range(P):
        one = Observations(y=ys[p][None], r_var=rs[p][None], locations=coords[p][None])
        single = filt.analyse(X[p : p + 1], one, HX=X[p : p + 1][..., vox[p]]).X_a
        assert float((batched[p] - single[0]).abs().max()) < 1e-10


def test_single_generator_draws_whole_batch():
    """With one generator the EnKF is still reproducible for the same batch."""
    X, picks, ys, rs, locs = _patients(P=2)
    obs = Observations.pad(ys, rs)
    HX = _hx(X, picks, obs.n_obs)
    a = StochasticEnKF().analyse(X, obs, HX=HX, generator=torch.Generator().manual_seed(1)).X_a
    b = StochasticEnKF().analyse(X, obs, HX=HX, generator=torch.Generator().manual_seed(1)).X_a
    c = StochasticEnKF().analyse(X, obs, HX=HX, generator=torch.Generator().manual_seed(2)).X_a
    assert torch.equal(a, b) and not torch.equal(a, c)
