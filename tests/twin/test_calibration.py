"""Predictive checks: the PIT of each observation under the twin's prediction made before it,
running coverage and the flag of a twin whose intervals stop covering its own observations."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from scipy import stats

from assimilation.calibration import PredictiveCheck, binomial_cdf, pit, summarize
from assimilation.filters.etkf import ETKF
from assimilation.observations import ImagingObservation, MarkerObservation
from assimilation.store import decode_twin, encode_twin
from assimilation.twin import assimilate, init_twin


def test_pit_is_the_cdf_of_the_ensemble_plus_noise_mixture():
    g = torch.Generator().manual_seed(4)
    hx = torch.randn(1, 12, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([[0.3, -2.0, 5.0]], dtype=torch.float64)
    r = torch.tensor([[0.25, 1.0, 0.01]], dtype=torch.float64)
    expected = [sum(stats.norm.cdf(float(y[0, j]), float(hx[0, i, j]), math.sqrt(float(r[0, j]))) for i in range(12)) / 12
                for j in range(3)]
    assert pit(hx, y, r)[0].tolist() == pytest.approx(expected, abs=1e-12)


def test_pit_is_uniform_for_observations_drawn_from_the_prediction():
    # y drawn from the very mixture the twin predicts: every PIT decile holds ~10 %.
    g = torch.Generator().manual_seed(0)
    m, n = 20_000, 8
    hx = torch.randn(n, m, generator=g, dtype=torch.float64) * 2.0
    pick = torch.randint(0, n, (m,), generator=g)
    y = hx[pick, torch.arange(m)] + 0.5 * torch.randn(m, generator=g, dtype=torch.float64)
    p = pit(hx, y, torch.full((m,), 0.25, dtype=torch.float64))
    counts = torch.histc(p, bins=10, min=0.0, max=1.0)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4
    inside = ((p >= 0.025) & (p <= 0.975)).double().mean()
    assert float(inside) == pytest.approx(0.95, abs=0.01)


@pytest.mark.parametrize("n,p", [(1, 0.95), (7, 0.95), (40, 0.95), (200, 0.5)])
def test_binomial_cdf_is_exact(n, p):
    for k in range(-1, n + 1):
        assert binomial_cdf(k, n, p) == pytest.approx(stats.binom.cdf(k, n, p), rel=1e-9, abs=1e-300)


def test_a_twin_is_flagged_only_when_its_coverage_is_too_low_to_be_chance():
    def checks(inside: int, outside: int) -> list[PredictiveCheck]:
        return ([PredictiveCheck("q", float(i), f"e{i}", 0.5) for i in range(inside)]
                + [PredictiveCheck("q", float(i), f"o{i}", 0.999) for i in range(outside)])

    assert not summarize(checks(19, 1)).flagged
    assert not summarize(checks(2, 2)).flagged  # too few checks to tell
    assert summarize(checks(10, 10)).flagged
    cal = summarize(checks(18, 2))
    assert (cal.n, cal.inside, cal.coverage) == (20, 18, 0.9)
    assert cal.histogram[5] == 18 and cal.histogram[9] == 2


def _scale_markers(events, factor: float):
    return [replace(o, value=o.value * factor) if isinstance(o, MarkerObservation) else o for o in events]


def test_each_analysis_checks_its_observations_and_the_checks_persist(events, patient):
    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin = init_twin(first.patient_id, first, 16)
    twin, report = assimilate(twin, [o for o in events if o.time <= first.time + (events[-1].time - first.time) / 2],
                              ETKF())
    checks = [c for r in report.analyses for c in r.checks]
    assert checks and all(0.0 <= c.pit <= 1.0 for c in checks)
    kinds = {c.quantity for c in checks}
    assert {"tumor_volume_ml", "ctdna_tumor_fraction", f"marker:{twin.marker_code}"} <= kinds
    assert twin.checks == tuple(checks)
    assert decode_twin(encode_twin(twin)).checks == twin.checks


def test_a_twin_fed_observations_its_model_cannot_explain_is_flagged(events):
    # The markers jump 30-fold after the first study, as no shedding coefficient in the prior
    # predicts: the checks fall outside, and the twin is flagged.
    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin = init_twin(first.patient_id, first, 16)
    twin, _ = assimilate(twin, _scale_markers([o for o in events if o.time > first.time], 30.0), ETKF())
    markers = [c for c in twin.checks if c.quantity.startswith("marker:")]
    assert summarize(markers).flagged
    honest = init_twin(first.patient_id, first, 16)
    honest, _ = assimilate(honest, [o for o in events if o.time > first.time], ETKF())
    assert summarize(c for c in honest.checks if c.quantity.startswith("marker:")).coverage > \
        summarize(markers).coverage
