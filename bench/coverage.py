"""Calibration of the twins' forecasts: how often the 95 % prediction interval of the 90-day
visible tumour volume contains the truth, over a cohort of virtual patients.

Run from the repository root: ``python -m bench.coverage [n_patients] [n_members]`` (defaults
24 and 16). Prints one row per patient, then as its last line one JSON object
``{"bench": "coverage", ...}``. Reports, does not assert.

Set-up: virtual patients (``models.virtual_patient``, seed 11) on a 16^3 grid of 5 mm voxels,
observed for 200 days (MRI every 6-10 weeks, LDH and ctDNA every 2-4 weeks, standard of care);
the rest of the treatment course is known as planned treatments, as in a clinic. Every patient
goes through ``assimilation.engine.Engine`` in one batch (in-memory store); its forecast from
the last analysis is scored against the true volume 90 days later. A blind twin (started from
the first study, given only the treatments) is scored alongside. The nominal coverage is 95 %;
with N members the sample quantiles themselves are noisy (N = 16: the 2.5 % and 97.5 %
quantiles sit between the two most extreme members), so expect some under-coverage at small N.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import torch

from assimilation.engine import Engine, EngineConfig
from assimilation.filters.etkf import ETKF
from assimilation.forecast import forecast
from assimilation.observations import ImagingObservation, TreatmentEvent
from assimilation.store import MemoryBackend, StateStore
from assimilation.twin import advance, assimilate, init_twin
from assimilation.virtual import typed_observations
from models.grid import Grid
from models.virtual_patient import CohortConfig, VirtualPatient, generate_patient

SEED = 11
HORIZON = 90.0
DAY0 = datetime(2025, 3, 3, tzinfo=timezone(timedelta(hours=1)))
NAMESPACE = uuid.UUID("5d1c3c4e-7a43-4f57-9a0e-2b3a6f1f9c77")
COHORT = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=200.0, truth_margin_days=100.0)


def events_of(p: VirtualPatient) -> list:
    """Observations until the end of the observed period; every treatment of the course
    (delivered until then, planned after)."""
    return typed_observations(p, DAY0, NAMESPACE, planned=True)


def main(n_patients: int = 24, n_members: int = 16) -> dict:
    torch.manual_seed(0)  # nothing here draws from the global generator; belt and braces
    patients = [generate_patient(i, SEED, COHORT) for i in range(n_patients)]
    streams = {p.pseudonym: events_of(p) for p in patients}
    engine = Engine(StateStore(MemoryBackend()), EngineConfig(n_members=n_members, horizons=(HORIZON,)))
    t0 = time.perf_counter()
    forecasts = {f.patient_id: f for f in engine.process([o for s in streams.values() for o in s])}
    elapsed = time.perf_counter() - t0

    rows = []
    print(f"{'patient':<18} {'true mL':>8} {'median':>8} {'2.5%':>8} {'97.5%':>8} {'in':>3} {'blind':>8} {'b-in':>4}")
    for p in patients:
        fc = forecasts[p.pseudonym]
        day = (fc.issued_for - DAY0).total_seconds() / 86400.0 + HORIZON
        truth = float(np.interp(day, p.truth_times.numpy(), p.truth_volume_ml.numpy()))
        lo, med, hi = (float(x) for x in fc.quantity("volume_ml")[0])
        # the blind twin: same start, same treatments, no observations
        first = next(o for o in streams[p.pseudonym] if isinstance(o, ImagingObservation))
        blind = init_twin(p.pseudonym, first, n_members)
        blind, _ = assimilate(blind, [o for o in streams[p.pseudonym] if isinstance(o, TreatmentEvent)], ETKF())
        blind = advance(blind, blind.days(fc.issued_for))
        blo, bmed, bhi = (float(x) for x in forecast(blind, (HORIZON,)).quantity("volume_ml")[0])
        row = dict(patient=p.pseudonym, truth=truth, median=med, lo=lo, hi=hi, inside=lo <= truth <= hi,
                   blind_median=bmed, blind_inside=blo <= truth <= bhi, blind_width=bhi - blo)
        rows.append(row)
        print(f"{p.pseudonym:<18} {truth:8.2f} {med:8.2f} {lo:8.2f} {hi:8.2f} {'y' if row['inside'] else 'n':>3} "
              f"{bmed:8.2f} {'y' if row['blind_inside'] else 'n':>4}")

    n = len(rows)
    coverage = sum(r["inside"] for r in rows) / n
    summary = {
        "bench": "coverage",
        "quantity": "visible tumour volume (mL)",
        "horizon_days": HORIZON,
        "nominal": 0.95,
        "n_patients": n,
        "n_members": n_members,
        "coverage": round(coverage, 3),
        # binomial standard error of the coverage estimate at this cohort size
        "coverage_se": round(math.sqrt(max(coverage * (1 - coverage), 1e-12) / n), 3),
        "mean_abs_error_ml": round(float(np.mean([abs(r["median"] - r["truth"]) for r in rows])), 3),
        "mean_interval_width_ml": round(float(np.mean([r["hi"] - r["lo"] for r in rows])), 3),
        "blind_coverage": round(sum(r["blind_inside"] for r in rows) / n, 3),
        "blind_mean_abs_error_ml": round(float(np.mean([abs(r["blind_median"] - r["truth"]) for r in rows])), 3),
        "blind_mean_interval_width_ml": round(float(np.mean([r["blind_width"] for r in rows])), 3),
        "engine_seconds": round(elapsed, 2),
        "device": str(engine.device),
        "torch": torch.__version__,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*args)
