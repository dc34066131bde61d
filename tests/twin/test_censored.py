"""Censored results (below or above an assay's limit) as censored likelihoods: the analysis
moves the ensemble to the censored posterior's first two moments, not to the limit."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from scipy import integrate, stats

from assimilation.filters.etkf import ETKF
from assimilation.observations import CtdnaObservation, ImagingObservation
from assimilation.operators import ObsBlock, censor_block
from assimilation.twin import assimilate, init_twin


def _posterior_moments(mu: float, S: float, r: float, L: float, below: bool) -> tuple[float, float]:
    """Mean and variance of X ~ N(mu, S) given Y = X + e on one side of L, e ~ N(0, r)."""
    def like(x):
        p = stats.norm.cdf((L - x) / math.sqrt(r))
        return p if below else 1.0 - p
    dens = lambda x: stats.norm.pdf(x, mu, math.sqrt(S)) * like(x)  # noqa: E731
    lo, hi = mu - 12 * math.sqrt(S), mu + 12 * math.sqrt(S)
    z = integrate.quad(dens, lo, hi, limit=200)[0]
    m = integrate.quad(lambda x: x * dens(x), lo, hi, limit=200)[0] / z
    v = integrate.quad(lambda x: (x - m) ** 2 * dens(x), lo, hi, limit=200)[0] / z
    return m, v


@pytest.mark.parametrize("below", [True, False])
@pytest.mark.parametrize("mu,S,r,L", [(0.0, 1.0, 0.04, 0.0), (1.0, 0.5, 0.2, -0.2), (-2.0, 2.0, 0.01, 0.5),
                                       (0.3, 0.1, 1.0, 0.2)])
def test_the_pseudo_observation_gives_the_censored_posterior_moments(mu, S, r, L, below):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, generator=g, dtype=torch.float64)
    hx = mu + math.sqrt(S) * (z - z.mean()) / z.std()  # sample mean mu, sample variance S exactly
    block = censor_block(ObsBlock(hx.view(1, 64, 1), torch.tensor([[L]], dtype=torch.float64),
                                  torch.tensor([[r]], dtype=torch.float64)), below=below)
    y, rs = float(block.y), float(block.r_var)
    m_kf = mu + S / (S + rs) * (y - mu)
    v_kf = S * rs / (S + rs)
    m, v = _posterior_moments(mu, S, r, L, below)
    assert m_kf == pytest.approx(m, abs=1e-6 * (1 + abs(m)))
    assert v_kf == pytest.approx(v, rel=1e-5)


def test_a_prediction_well_inside_the_censored_side_learns_nothing():
    hx = torch.linspace(-6.0, -5.0, 16, dtype=torch.float64).view(1, 16, 1)
    block = censor_block(ObsBlock(hx, torch.tensor([[0.0]], dtype=torch.float64), torch.tensor([[0.04]], dtype=torch.float64)),
                         below=True)
    assert float(block.r_var) >= 1e5


def test_a_twin_predicting_ctdna_above_a_negative_result_lowers_it(events):
    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin = init_twin(first.patient_id, first, 16)
    ct = next(o for o in events if isinstance(o, CtdnaObservation) and o.time > first.time)
    twin, _ = assimilate(twin, [o for o in events if first.time < o.time < ct.time], ETKF())
    from assimilation.forecast import forecast

    predicted = float(forecast(twin, (1e-3,)).ctdna_fraction[0, 0, 1])
    limit = predicted / 20.0  # the assay says: below a twentieth of what the twin expects
    negative = replace(ct, tumor_fraction=limit, comparator="<", limit=limit, below_lod=True)
    after, report = assimilate(twin, [negative], ETKF())
    assert report.analyses[0].checks[0].pit < 0.025  # the twin did not expect it
    lowered = float(forecast(after, (1e-3,)).ctdna_fraction[0, 0, 1])
    assert lowered < 0.5 * predicted
    # The same result with a limit far above the prediction carries (almost) no information: the
    # analysis leaves the ctDNA where it was, but for the parameters' spread relaxation (RTPS),
    # which any analysis applies.
    loose = replace(ct, tumor_fraction=min(1.0, predicted * 50), comparator="<", limit=min(1.0, predicted * 50))
    same, report = assimilate(twin, [loose], ETKF())
    assert 0.025 <= report.analyses[0].checks[0].pit <= 0.5
    assert float(forecast(same, (1e-3,)).ctdna_fraction[0, 0, 1]) > 0.8 * predicted
