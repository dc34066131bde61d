"""Forecasts: ordered quantiles, probability maps, and therapy rehearsal in one batch."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import torch

from assimilation.filters.etkf import ETKF
from assimilation.forecast import AS_PLANNED, QUANTITIES, forecast, radiotherapy_course
from assimilation.observations import ImagingObservation, TreatmentEvent
from assimilation.twin import assimilate, init_twin
from schemas.validate import validate_forecast


@pytest.fixture(scope="module")
def untreated(events):
    """A twin after ~2 weeks of observations and before any treatment."""
    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin = init_twin(first.patient_id, first, 16)
    head = [o for o in events if o.time <= first.time + timedelta(days=12) and not isinstance(o, TreatmentEvent)]
    twin, report = assimilate(twin, head, ETKF())
    assert report.analyses and not twin.treatments
    return twin


@pytest.fixture(scope="module")
def rehearsal(untreated):
    start = untreated.time + timedelta(days=3)
    plans = {"none": [], "rt_60gy": radiotherapy_course(untreated.patient_id, start, fractions=30, dose_gy=2.0)}
    return forecast(untreated, (30.0, 60.0, 90.0, 180.0), plans)


def test_quantiles_are_ordered_and_maps_are_probabilities(rehearsal, untreated):
    fc = rehearsal
    assert fc.scenarios == (AS_PLANNED, "none", "rt_60gy")
    for q in QUANTITIES:
        v = getattr(fc, q)
        assert v.shape == (3, 4, 3)
        assert bool((v[..., 0] <= v[..., 1]).all() and (v[..., 1] <= v[..., 2]).all()), q
        assert bool(torch.isfinite(v).all())
    assert fc.prob_visible.shape == (3, 4, 16, 16, 16)
    assert float(fc.prob_visible.min()) >= 0.0 and float(fc.prob_visible.max()) <= 1.0
    assert bool((fc.ctdna_fraction >= 0).all() and (fc.ctdna_fraction < 1).all())
    # every member's marker >= its tumour-independent baseline, so the median is too; the
    # interval may reach below it only through the model error the twin has learnt (a lab
    # result can fall under the population baseline)
    assert bool((fc.marker[..., 1] >= 180.0 - 1e-3).all())
    if fc.model_error["marker"] == 0.0:
        assert bool((fc.marker >= 180.0 - 1e-3).all())
    # the map and the volumes describe the same members: the expected visible volume (sum of
    # probabilities x voxel volume) lies within the volume's 95 % interval, and nothing is
    # visible outside the brain
    expected = fc.prob_visible.sum(dim=(-3, -2, -1)) * 0.125
    assert bool((fc.volume_ml[..., 0] <= expected + 1e-4).all() and (expected <= fc.volume_ml[..., 2] + 1e-4).all())
    brain = untreated.tissue > 0
    assert not bool(fc.prob_visible[..., ~brain].any())


def test_radiotherapy_rehearsal_lowers_the_forecast_volume(rehearsal):
    fc = rehearsal
    none = fc.quantity("volume_ml", "none")[:, 1]
    rt = fc.quantity("volume_ml", "rt_60gy")[:, 1]
    # The twin knows no treatment yet: "as planned" is "no treatment".
    assert torch.equal(fc.quantity("volume_ml", AS_PLANNED), fc.quantity("volume_ml", "none"))
    # Untreated high-grade glioma keeps growing; 30 x 2 Gy shrinks it well below that.
    assert bool((none[1:] > none[:-1]).all())
    assert bool((rt < none).all())
    assert float(rt[2]) < 0.5 * float(none[2])
    assert bool((fc.quantity("burden_ml", "rt_60gy")[:, 1] < fc.quantity("burden_ml", "none")[:, 1]).all())


def test_scenarios_run_in_one_batch_like_separate_forecasts(untreated, rehearsal):
    # Batching scenarios x members must not mix them up: the batched RT scenario equals a
    # forecast with that plan alone.
    plan = radiotherapy_course(untreated.patient_id, untreated.time + timedelta(days=3))
    alone = forecast(untreated, (30.0, 60.0, 90.0, 180.0), {"rt_60gy": plan})
    assert torch.allclose(alone.volume_ml[1], rehearsal.volume_ml[2])
    assert torch.allclose(alone.prob_visible[1], rehearsal.prob_visible[2])


def test_forecast_records_follow_the_forecast_contract(rehearsal, untreated):
    issued = datetime(2025, 4, 1, 12, 0, tzinfo=timezone.utc)
    records = rehearsal.to_records(issued)
    assert [r["scenario"] for r in records] == [AS_PLANNED, "none", "rt_60gy"]
    for r in records:
        assert validate_forecast(json.loads(json.dumps(r))) == []
    rt = records[2]
    assert rt["analysis_time"] == untreated.time.isoformat() and rt["members"] == 16
    h90 = rt["horizons"][2]
    assert h90["days"] == 90.0
    volume = h90["quantities"]["tumor_volume_ml"]
    assert volume["unit"] == "mL" and volume["lo"] <= volume["median"] <= volume["hi"]
    assert volume["median"] == pytest.approx(float(rehearsal.quantity("volume_ml", "rt_60gy")[2, 1]))
    assert set(h90["quantities"]) == {"tumor_volume_ml", "burden", "ctdna_tumor_fraction", "marker:2532-0"}
    # the same forecast republished keeps its id; another scenario or analysis gets another
    assert rehearsal.to_records(issued)[2]["forecast_id"] == rt["forecast_id"]
    assert len({r["forecast_id"] for r in records}) == 3
    with pytest.raises(ValueError):
        forecast(untreated, (60.0, 30.0))
