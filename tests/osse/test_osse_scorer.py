"""The scorer (bench.osse.scorer) on inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.osse import scorer


@settings(max_examples=30, deadline=None)
@given(mu=st.floats(-50.0, 50.0), sigma=st.floats(0.01, 20.0), z=st.floats(-6.0, 6.0))
def test_crps_of_quantiles_and_members_match_the_gaussian_closed_form(mu, sigma, z):
    """The split normal through (mu -+ 1.96 sigma, mu) is N(mu, sigma²): its quantile CRPS, and
    the exact CRPS of 4000 members at the Gaussian's quantiles, equal the closed form."""
    y = mu + z * sigma
    exact = scorer.crps_gaussian(mu, sigma, y)
    q = scorer.split_normal_quantiles(mu - scorer.Z975 * sigma, mu, mu + scorer.Z975 * sigma)
    assert scorer.crps_quantiles(scorer.CRPS_LEVELS, q, y) == pytest.approx(exact, rel=2e-3)
    members = scorer.split_normal_quantiles(mu - scorer.Z975 * sigma, mu, mu + scorer.Z975 * sigma,
                                            levels=(np.arange(4000) + 0.5) / 4000)
    assert scorer.crps_ensemble(members, y) == pytest.approx(exact, rel=2e-3, abs=1e-4 * sigma)


def test_crps_by_hand():
    # members 0 and 2 at y = 1: E|X - y| = 1, E|X - X'| = (0 + 2 + 2 + 0) / 4 = 1 -> 1 - 1/2
    assert scorer.crps_ensemble([0.0, 2.0], 1.0) == pytest.approx(0.5)
    # a point forecast's CRPS is its absolute error
    assert scorer.crps_ensemble([3.0], 1.0) == pytest.approx(2.0)
    assert scorer.crps_quantiles([0.5], [3.0], 1.0) == pytest.approx(2.0)
    # the closed form at the mean: sigma (2 phi(0) - 1/sqrt(pi)) = sigma (sqrt(2) - 1) / sqrt(pi)
    assert scorer.crps_gaussian(0.0, 2.0, 0.0) == pytest.approx(2.0 * (math.sqrt(2.0) - 1.0) / math.sqrt(math.pi))


def test_split_normal_passes_through_its_three_quantiles():
    q = scorer.split_normal_quantiles(2.0, 5.0, 14.0, levels=[0.025, 0.5, 0.975])
    assert q.tolist() == pytest.approx([2.0, 5.0, 14.0])
    assert scorer.split_normal_quantiles(4.0, 4.0, 4.0, levels=[0.1, 0.9]).tolist() == [4.0, 4.0]


def test_relative_errors_median_bias_and_within():
    rel = [scorer.relative_error(f, t, 0.5) for f, t in ((11.0, 10.0), (8.0, 10.0), (10.0, 10.0), (30.0, 10.0))]
    assert rel == pytest.approx([0.1, -0.2, 0.0, 2.0])
    assert scorer.mdare(rel) == pytest.approx(0.15)
    assert scorer.bias(rel) == pytest.approx(0.05)
    assert scorer.within(rel) == pytest.approx(0.5)
    # below the floor forecast and truth are the floor: no error; a vanishing truth is the floor
    assert scorer.relative_error(0.1, 0.0, 0.5) == 0.0
    assert scorer.relative_error(5.0, 0.0, 0.5) == pytest.approx(9.0)
    assert math.isnan(scorer.mdare([]))


def test_coverage_counts_truths_inside_inclusive_intervals():
    assert scorer.coverage([0, 0, 5, 1], [10, 10, 6, 2], [10, 11, 5.5, 0.5]) == pytest.approx(0.5)


def test_scored_sample_coverage_and_crps_on_the_floored_scale():
    s = scorer.Scored("f", "ctdna", 30.0, "p", 0, truth=1e-4, median=5e-4, floor=1e-3, lo=2e-4, hi=8e-4)
    assert s.rel == 0.0 and s.covered is True and s.crps() == pytest.approx(0.0, abs=1e-12)
    point = scorer.Scored("persistence", "ldh", 30.0, "p", 0, truth=200.0, median=180.0, floor=1.0)
    assert point.covered is None and point.crps() == pytest.approx(20.0)


def test_dice_and_centre_of_mass_by_hand():
    a = np.zeros((4, 4, 4), dtype=bool)
    b = np.zeros_like(a)
    a[0, 0, 0:4] = True        # 4 voxels
    b[0, 0, 2:4] = True        # 2 of them
    b[0, 1, 0:2] = True        # and 2 others
    assert scorer.dice(a, b) == pytest.approx(0.5)
    assert scorer.dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert scorer.dice(a, np.zeros_like(a)) == 0.0
    c = np.zeros_like(a)
    d = np.zeros_like(a)
    c[1, 1, 1] = True
    d[1, 3, 1] = True
    assert scorer.com_distance(c, d, (2.0, 2.5, 3.0)) == pytest.approx(5.0)  # 2 voxels of 2.5 mm
    assert math.isnan(scorer.com_distance(c, np.zeros_like(a), (1.0, 1.0, 1.0)))
    assert scorer.center_of_mass(c, (2.0, 2.5, 3.0)).tolist() == pytest.approx([3.0, 3.75, 4.5])


def test_summaries_per_horizon_and_pooled():
    samples = [scorer.Scored("twin", "flair_ml", h, "p", k, truth=10.0, median=10.0 * (1 + e), floor=0.5,
                             lo=5.0, hi=hi, dice=dc)
               for k, (h, e, hi, dc) in enumerate(((30.0, 0.1, 12.0, 0.8), (30.0, 0.3, 9.0, 0.6), (60.0, -0.5, 12.0, 0.4)))]
    rows = {(r.horizon): r for r in scorer.summarize(samples)}
    assert rows[30.0].n == 2 and rows[30.0].mdare == pytest.approx(0.2) and rows[30.0].dice == pytest.approx(0.7)
    assert rows[60.0].mdare == pytest.approx(0.5) and rows[60.0].coverage == 1.0
    assert rows[None].n == 3 and rows[None].mdare == pytest.approx(0.3) and rows[None].bias == pytest.approx(0.1)
    assert rows[30.0].coverage == pytest.approx(0.5)  # the truth, 10, lies above the second hi, 9
    assert math.isnan(rows[None].com_mm)


def test_log_ratio_band_and_saturation():
    lo, hi = scorer.log_ratio_band([1.0] * 41, [math.exp(k / 10.0) for k in range(-20, 21)], 1e-3)
    # 41 log-ratios -2.0 ... 2.0: the 2.5 % quantile sits at position 0.025 * 40 = 1 (linear interpolation)
    assert (lo, hi) == pytest.approx((-1.9, 1.9))
    assert scorer.saturated(400.0, 50.0, 600.0) and not scorer.saturated(400.0, 350.0, 600.0)
    assert not scorer.saturated(200.0, 50.0, 600.0)
