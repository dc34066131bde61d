"""Predictive checks: the PIT of each observation under the twin's prediction made before it,
running coverage and the flag of a twin whose intervals stop covering its own observations."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from scipy import stats

from assimilation.calibration import PredictiveCheck, binomial_cdf, mixture_quantiles, model_error_rate, pit, summarize
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


def test_mixture_quantiles_invert_the_mixture_cdf():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(3, 7, generator=g, dtype=torch.float64)
    var = torch.tensor([0.01, 0.5, 4.0], dtype=torch.float64)
    qs = (0.025, 0.5, 0.975)
    q = mixture_quantiles(centres, var, qs)
    for b in range(3):
        for k, level in enumerate(qs):
            cdf = stats.norm.cdf(float(q[b, k]), centres[b].numpy(), math.sqrt(float(var[b]))).mean()
            assert cdf == pytest.approx(level, abs=1e-9)
    # one member: the Gaussian's own quantiles
    one = mixture_quantiles(torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64), qs)
    assert one[0].tolist() == pytest.approx([1.0 + 0.5 * stats.norm.ppf(p) for p in qs], abs=1e-9)


def _check(d: float, s2: float, r: float, dt: float) -> PredictiveCheck:
    return PredictiveCheck("q", 0.0, "e", 0.5, innovation=d, spread_var=s2, r_var=r, dt_days=dt)


def test_model_error_rate_recovers_a_random_walk_error():
    # Innovations of a truth that drifts from the model as a random walk of q = 0.002/day:
    # E[d²] = s² + r + q dt. With many checks the estimate tends to q whatever the prior.
    g = torch.Generator().manual_seed(6)
    q, s2, r = 0.002, 0.01, 0.004
    dts = 20.0 + 60.0 * torch.rand(4000, generator=g, dtype=torch.float64)
    d = torch.randn(4000, generator=g, dtype=torch.float64) * (s2 + r + q * dts).sqrt()
    checks = [_check(float(di), s2, r, float(t)) for di, t in zip(d, dts)]
    assert model_error_rate(checks, prior_rate=0.0, prior_days=90.0) == pytest.approx(q, rel=0.1)
    assert model_error_rate(checks, prior_rate=0.05, prior_days=90.0) == pytest.approx(q, rel=0.15)
    # no checks: the prior; consistent innovations (d² = s² + r): no model error
    assert model_error_rate([], prior_rate=0.003, prior_days=90.0) == 0.003
    assert model_error_rate([_check(math.sqrt(s2 + r), s2, r, 30.0)] * 10, 0.0, 90.0) == pytest.approx(0.0, abs=1e-15)
    # an analysis with no prediction interval before it (dt 0) teaches nothing
    assert model_error_rate([_check(5.0, 0.0, 0.0, 0.0)], 0.001, 90.0) == pytest.approx(0.001)


def test_forecast_intervals_widen_with_the_model_error_the_twin_has_learnt(events):
    from assimilation.forecast import forecast
    from assimilation.twin import TwinConfig

    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin = init_twin(first.patient_id, first, 8)
    plain = forecast(twin, (30.0, 90.0))
    rate = 0.004  # log-variance per day: sd 0.35 at 30 days, 0.6 at 90
    config = TwinConfig(model_error_prior=(("tumor_volume_ml", rate), ("marker", rate), ("ctdna_tumor_fraction", rate)))
    dressed = forecast(twin, (30.0, 90.0), config=config)
    for name in ("volume_ml", "burden_ml", "marker"):
        p, d = getattr(plain, name)[0], getattr(dressed, name)[0]  # [H, 3]
        assert bool((d[:, 2] - d[:, 0] > p[:, 2] - p[:, 0]).all()), name
        assert float(d[1, 2] / d[1, 0]) > float(d[0, 2] / d[0, 0]), name  # wider (in ratio) further out
    # with no learnt error and a zero prior the forecast is the members' own quantiles
    assert torch.equal(forecast(twin, (30.0, 90.0)).volume_ml, plain.volume_ml)


def test_forecast_records_carry_the_twins_calibration(events):
    from datetime import datetime, timezone

    from assimilation.forecast import forecast
    from schemas import validate_forecast

    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin, _ = assimilate(init_twin(first.patient_id, first, 8), [o for o in events if o.time > first.time][:12], ETKF())
    fc = forecast(twin, (30.0,))
    record = fc.to_records(datetime(2026, 1, 1, tzinfo=timezone.utc))[0]
    assert validate_forecast(record) == []
    cal = record["diagnostics"]["calibration"]
    assert cal["all"]["checks"] == len(twin.checks) > 0
    assert sum(cal[q]["checks"] for q in cal if q != "all") == len(twin.checks)
    assert set(record["diagnostics"]["model_error_per_day"]) == {"tumor_volume_ml", "marker", "ctdna_tumor_fraction"}


def test_a_twin_knows_the_data_time_of_what_it_has_applied(events):
    from datetime import timedelta

    from assimilation.forecast import forecast

    first = next(o for o in events if isinstance(o, ImagingObservation))
    later = [o for o in events if o.time > first.time][:6]
    # recorded a day after they occurred, except one recorded 20 days late
    stamped = [replace(o, recorded_at=o.time + timedelta(days=20 if k == 2 else 1)) for k, o in enumerate(later)]
    twin = init_twin(first.patient_id, first, 8)
    assert twin.data_time == first.time  # no recorded_at: the event time
    twin, _ = assimilate(twin, stamped, ETKF())
    expected = max(o.recorded_at for o in stamped)
    assert twin.data_time == expected
    assert decode_twin(encode_twin(twin)).data_time == expected
    fc = forecast(twin, (30.0,))
    assert fc.data_time == expected
    from datetime import datetime, timezone

    from schemas import parse_time, validate_forecast

    record = fc.to_records(datetime(2026, 1, 1, tzinfo=timezone.utc))[0]
    assert validate_forecast(record) == [] and parse_time(record["data_time"]) == expected


def test_the_learnt_model_error_is_capped(events):
    from assimilation.forecast import model_error_rates
    from assimilation.twin import TwinConfig

    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin = init_twin(first.patient_id, first, 8)
    wild = tuple(PredictiveCheck("tumor_volume_ml", float(k), f"e{k}", 0.999, innovation=5.0, spread_var=0.01,
                                 r_var=0.01, dt_days=10.0) for k in range(20))
    rates = model_error_rates(replace(twin, checks=wild), TwinConfig())
    assert rates["tumor_volume_ml"] == TwinConfig().model_error_max_rate
