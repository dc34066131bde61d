"""LETKF: Gaspari-Cohn taper, locality, equivalence with the ETKF, 3-D voxel blocks."""

from __future__ import annotations

import math

import pytest
import torch

from assimilation import ETKF, LETKF, Observations, Points, VoxelGrid, gaspari_cohn
from assimilation.filters import etkf_transform

f64 = torch.float64


def test_gaspari_cohn_radius_convention():
    r = 10.0
    d = torch.tensor([0.0, 2.5, 5.0, 7.5, 9.999, 10.0, 12.0, math.inf], dtype=f64)
    w = gaspari_cohn(d, r)
    assert float(w[0]) == 1.0
    assert abs(float(w[2]) - 5.0 / 24.0) < 1e-12  # at the half-width c = radius / 2
    assert float(w[4]) < 1e-10 and float(w[4]) >= 0.0
    assert w[5:].tolist() == [0.0, 0.0, 0.0]
    assert bool((w[1:] <= w[:-1]).all())
    # Continuous where the two pieces meet, and no localization at an infinite radius.
    eps = 1e-9
    left, right = gaspari_cohn(torch.tensor([5.0 - eps, 5.0 + eps], dtype=f64), r)
    assert abs(float(left - right)) < 1e-8
    assert gaspari_cohn(torch.tensor([0.0, 1e6], dtype=f64), math.inf).tolist() == [1.0, 1.0]


def _l96_like(P=2, N=10, n=40, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(P, N, n, generator=g, dtype=f64).cumsum(dim=-1) * 0.3 + 2.0
    idx = torch.randperm(n, generator=g)[:m].sort().values
    y = X.mean(dim=1)[:, idx] + torch.randn(P, m, generator=g, dtype=f64)
    obs = Observations(y=y, r_var=torch.full((P, m), 0.7, dtype=f64),
                       locations=idx.to(f64).expand(P, m))
    return X, obs, (lambda Z: Z[..., idx])


def test_letkf_infinite_radius_equals_etkf():
    X, obs, h = _l96_like(m=25)
    geo = Points(torch.arange(40, dtype=f64), period=40.0)
    a = LETKF(geometry=geo, radius=math.inf, inflation=1.05).analyse(X, obs, h=h).X_a
    b = ETKF(inflation=1.05).analyse(X, obs, h=h).X_a
    assert float((a - b).abs().max()) < 1e-5
    assert float((a - b).abs().max()) < 1e-10


def test_letkf_1d_locality_periodic():
    """One observation at x = 1 with radius 5: grid points at periodic distance >= 5 are
    untouched (bit for bit), nearer ones move, across the periodic seam too."""
    X, _, _ = _l96_like(P=1)
    obs = Observations(y=torch.tensor([[10.0]], dtype=f64), r_var=torch.ones(1, 1, dtype=f64),
                       locations=torch.tensor([[1.0]], dtype=f64))
    geo = Points(torch.arange(40, dtype=f64), period=40.0)
    X_a = LETKF(geometry=geo, radius=5.0).analyse(X, obs, HX=X[..., 1:2]).X_a
    changed = (X_a != X).any(dim=1)[0]
    expected = torch.tensor([min(abs(i - 1), 40 - abs(i - 1)) < 5 for i in range(40)])
    assert torch.equal(changed, expected)
    assert bool(changed[37]) and not bool(changed[36])


def _brute_force_voxel_letkf(X, obs, HX, grid: VoxelGrid, radius: float) -> torch.Tensor:
    """Loop over blocks: distances from each nominal block centre to every observation."""
    P, N, n = X.shape
    b = grid.block
    v2s = grid.voxel_to_state()
    mean = X.mean(dim=1)
    A = X - mean[:, None]
    Y = HX - HX.mean(dim=1, keepdim=True)
    d = obs.y - HX.mean(dim=1)
    out = X.clone()
    h = torch.tensor(grid.spacing, dtype=f64)
    nb = grid.blocks_per_axis
    for bx in range(nb[0]):
        for by in range(nb[1]):
            for bz in range(nb[2]):
                ids = [int(v2s[(i * grid.shape[1] + j) * grid.shape[2] + k])
                       for i in range(bx * b, min((bx + 1) * b, grid.shape[0]))
                       for j in range(by * b, min((by + 1) * b, grid.shape[1]))
                       for k in range(bz * b, min((bz + 1) * b, grid.shape[2]))]
                ids = [i for i in ids if i >= 0]
                if not ids:
                    continue
                centre = torch.tensor([bx, by, bz], dtype=f64) * b + (b - 1) / 2
                for p in range(P):
                    dist = ((obs.locations[p] - centre) * h).norm(dim=-1)
                    w = gaspari_cohn(dist, radius)
                    w = torch.where(w > 1e-6, w, 0.0)  # the LETKF's default min_weight
                    if not bool((w > 0).any()):
                        continue
                    s = (w / obs.r_var[p]).sqrt()
                    T = etkf_transform(Y[p] * s, d[p] * s)
                    out[p][:, ids] = mean[p, ids] + T.T @ A[p][:, ids]
    return out


def test_voxel_letkf_matches_brute_force():
    """Cell-list search on an awkward grid (9 x 8 x 7, blocks of 3, a mask, anisotropic
    spacing, off-grid and fractional observation positions) equals the plain loop."""
    g = torch.Generator().manual_seed(1)
    shape = (9, 8, 7)
    mask = torch.rand(shape, generator=g) < 0.7
    grid = VoxelGrid(shape, mask=mask, block=3, spacing=(1.0, 1.5, 2.0))
    P, N, m = 2, 6, 30
    X = torch.randn(P, N, grid.n_state, generator=g, dtype=f64)
    loc = torch.rand(P, m, 3, generator=g, dtype=f64) * torch.tensor([12.0, 11.0, 10.0], dtype=f64) - 1.5
    HX = torch.randn(P, N, m, generator=g, dtype=f64)
    obs = Observations(y=torch.randn(P, m, generator=g, dtype=f64),
                       r_var=0.5 + torch.rand(P, m, generator=g, dtype=f64), locations=loc)
    for radius in (3.0, 6.5):
        got = LETKF(geometry=grid, radius=radius, chunk=7).analyse(X, obs, HX=HX).X_a
        ref = _brute_force_voxel_letkf(X, obs, HX, grid, radius)
        assert float((got - ref).abs().max()) < 1e-10
        assert not torch.equal(got, X)


def test_voxel_letkf_infinite_radius_with_parameters_equals_etkf():
    g = torch.Generator().manual_seed(2)
    shape = (8, 8, 8)
    mask = torch.rand(shape, generator=g) < 0.8
    grid = VoxelGrid(shape, mask=mask, block=4, n_extra=3)
    X = torch.randn(2, 12, grid.n_state, generator=g, dtype=f64)
    m = 40
    pick = torch.randperm(grid.n_field, generator=g)[:m]
    vox = mask.nonzero()[pick].to(f64)
    obs = Observations(y=torch.randn(2, m, generator=g, dtype=f64), r_var=torch.ones(2, m, dtype=f64),
                       locations=vox.expand(2, m, 3))
    HX = X[..., pick]
    a = LETKF(geometry=grid, radius=math.inf).analyse(X, obs, HX=HX).X_a
    b = ETKF().analyse(X, obs, HX=HX).X_a
    assert float((a - b).abs().max()) < 1e-10
    # extra="prior" leaves the parameters alone.
    c = LETKF(geometry=grid, radius=math.inf, extra="prior").analyse(X, obs, HX=HX).X_a
    assert torch.equal(c[..., -3:], X[..., -3:])
    assert float((c[..., :-3] - b[..., :-3]).abs().max()) < 1e-10


def test_voxel_letkf_improves_smooth_field_and_is_local(helpers):
    g = torch.Generator().manual_seed(3)
    shape, N = (16, 16, 16), 24
    grid = VoxelGrid(shape, block=4)
    fields = helpers.smooth_field(shape, N + 1, g, length=2.0)
    truth = grid.to_state(fields[0])[None]
    X = grid.to_state(fields[1:])[None]  # prior: same climatology, independent of the truth
    n = grid.n_state
    loc = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=f64) for s in shape], indexing="ij"),
                      dim=-1).reshape(1, n, 3)
    r = 0.25
    y = truth + r**0.5 * torch.randn(1, n, generator=g, dtype=f64)
    obs = Observations(y=y, r_var=torch.full((1, n), r, dtype=f64), locations=loc)
    res = LETKF(geometry=grid, radius=4.0).analyse(X, obs, h=lambda Z: Z)
    rmse_b = float((X.mean(1) - truth).square().mean().sqrt())
    rmse_a = float((res.X_a.mean(1) - truth).square().mean().sqrt())
    assert rmse_a < 0.6 * rmse_b
    assert float(res.diagnostics.spread_analysis[0]) < float(res.diagnostics.spread_prior[0])

    # Locality: one observation at voxel (0, 0, 0). Blocks whose centre lies >= radius away keep
    # their prior exactly; the observation's own block moves.
    one = Observations(y=torch.tensor([[5.0]], dtype=f64), r_var=torch.ones(1, 1, dtype=f64),
                       locations=torch.zeros(1, 1, 3, dtype=f64))
    X_a = LETKF(geometry=grid, radius=4.0).analyse(X, one, HX=X[..., :1]).X_a
    moved = grid.to_field((X_a != X).any(dim=1).to(f64))[0]
    assert bool(moved[:4, :4, :4].all())
    assert not bool(moved[4:].any()) and not bool(moved[:, 4:].any()) and not bool(moved[:, :, 4:].any())
    assert torch.equal(X_a[0, :, -1], X[0, :, -1])


def test_letkf_refuses_full_R():
    X, obs, h = _l96_like(P=1)
    full = Observations(y=obs.y, R=torch.eye(40, dtype=f64)[None], locations=obs.locations)
    with pytest.raises(ValueError, match="diagonal"):
        LETKF(geometry=Points(torch.arange(40, dtype=f64)), radius=4.0).analyse(X, full, h=h)


def test_points_custom_distance_equals_periodic_default():
    X, obs, h = _l96_like(m=30)

    def ring(centres, locations):  # [G, 1], [P, m, 1] -> [P, G, m]
        d = (locations[:, None, :, 0] - centres[None, :, None, 0]).abs()
        return torch.minimum(d, 40.0 - d)

    a = LETKF(geometry=Points(torch.arange(40, dtype=f64), period=40.0), radius=8.0).analyse(X, obs, h=h).X_a
    b = LETKF(geometry=Points(torch.arange(40, dtype=f64), distance=ring), radius=8.0).analyse(X, obs, h=h).X_a
    assert float((a - b).abs().max()) < 1e-12
    c = LETKF(geometry=Points(torch.arange(40, dtype=f64)), radius=8.0).analyse(X, obs, h=h).X_a
    assert float((a - c).abs().max()) > 1e-3  # without the period the seam is a wall
