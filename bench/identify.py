"""Parameter identifiability benchmark: the twin experiment of tests/twin over several seeds.

    python -m bench.identify [--seeds 7 8 9] [--patients 3] [--members 16] [--trace]

Per seed: virtual patients at the CI size (16³ voxels of 5 mm, 200 days observed), each
assimilated by an N-member twin with the ETKF (voxel stage localized); reports the mean
|log error| of D and rho of the prior draws and of the assimilated ensemble mean, their ratios,
the 90-day visible-volume forecast error (assimilated and blind) and the wall time per analysis
(the ``_analyse`` calls alone, and the whole assimilation divided by its analyses).
``--trace`` prints, per analysis, the ensemble-mean log D and its movement.

Prints a table, then as its last line one JSON object {"bench": "identify", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import torch

import assimilation.twin as twin_mod
from assimilation.filters.etkf import ETKF
from assimilation.forecast import forecast
from assimilation.observations import ImagingObservation, TreatmentEvent
from assimilation.twin import PARAM_NAMES, advance, assimilate, init_twin
from assimilation.virtual import typed_observations
from models.grid import Grid
from models.virtual_patient import CohortConfig, generate_patient

DAY0 = datetime(2025, 3, 3, tzinfo=timezone(timedelta(hours=1)))
NAMESPACE = uuid.UUID("0b7b7f0e-3c1a-4d51-9d8e-6f2b8f1c2a11")
COHORT = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=200.0, truth_margin_days=100.0)
GROWTH = [PARAM_NAMES.index("D"), PARAM_NAMES.index("rho")]


class _Timer:
    """Wraps ``assimilation.twin._analyse`` to time it (and optionally trace log D)."""

    def __init__(self, trace: bool, truth: list[float] | None = None):
        self.seconds = 0.0
        self.calls = 0
        self.trace = trace
        self.truth = truth
        self._inner = twin_mod._analyse

    def __call__(self, twin, items, analyser, config):
        start = time.perf_counter()
        new, record = self._inner(twin, items, analyser, config)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        if self.trace and self.truth is not None:
            before = twin.log_params[:, GROWTH].mean(0)
            after = new.log_params[:, GROWTH].mean(0)
            kinds = sorted({type(o).__name__[:6] for o in items})
            print(f"    t={twin.clock:6.1f} {','.join(kinds):28s} logD err {float(before[0]) - self.truth[0]:+.3f}"
                  f" -> {float(after[0]) - self.truth[0]:+.3f}  rho err {float(before[1]) - self.truth[1]:+.3f}"
                  f" -> {float(after[1]) - self.truth[1]:+.3f}  sd D {float(new.log_params[:, 0].std()):.3f}")
        return new, record


def run_seed(seed: int, n_patients: int, members: int, trace: bool) -> dict:
    rows = []
    for i in range(n_patients):
        p = generate_patient(i, seed, COHORT)
        events = typed_observations(p, DAY0, NAMESPACE, planned=True)
        first = next(o for o in events if isinstance(o, ImagingObservation))
        prior = init_twin(p.pseudonym, first, members)
        truth = torch.tensor([math.log(p.params[n]) for n in PARAM_NAMES])
        timer = _Timer(trace, [float(truth[k]) for k in GROWTH])
        twin_mod._analyse = timer
        try:
            if trace:
                print(f"  patient {i}: true D {p.params['D']:.3f} rho {p.params['rho']:.4f}")
            start = time.perf_counter()
            twin, report = assimilate(prior, events, ETKF())
            total = time.perf_counter() - start
        finally:
            twin_mod._analyse = timer._inner
        blind, _ = assimilate(prior, [o for o in events if isinstance(o, TreatmentEvent)], ETKF())
        blind = advance(blind, twin.clock)
        day = (twin.time - DAY0).total_seconds() / 86400.0 + 90.0
        true_volume = float(np.interp(day, p.truth_times.numpy(), p.truth_volume_ml.numpy()))
        va = forecast(twin, (90.0,)).quantity("volume_ml")[0]
        vb = forecast(blind, (90.0,)).quantity("volume_ml")[0]
        rows.append({
            "err_prior": (prior.log_params.mean(0) - truth).abs()[GROWTH],
            "err_post": (twin.log_params.mean(0) - truth).abs()[GROWTH],
            "vol_assim": abs(float(va[1]) - true_volume),
            "vol_blind": abs(float(vb[1]) - true_volume),
            "inside": float(va[0]) <= true_volume <= float(va[2]),
            "analysis_s": timer.seconds / max(1, timer.calls),
            "total_s": total / max(1, len(report.analyses)),
        })
    prior = torch.stack([r["err_prior"] for r in rows]).mean(0)
    post = torch.stack([r["err_post"] for r in rows]).mean(0)
    ratio = post / prior
    return {
        "seed": seed,
        "D_prior": float(prior[0]), "D_post": float(post[0]), "D_ratio": float(ratio[0]),
        "rho_prior": float(prior[1]), "rho_post": float(post[1]), "rho_ratio": float(ratio[1]),
        "D_ratio_per_patient": [float(r["err_post"][0] / r["err_prior"][0]) for r in rows],
        "vol_assim_ml": float(np.mean([r["vol_assim"] for r in rows])),
        "vol_blind_ml": float(np.mean([r["vol_blind"] for r in rows])),
        "inside": sum(r["inside"] for r in rows),
        "analysis_s": float(np.mean([r["analysis_s"] for r in rows])),
        "per_analysis_total_s": float(np.mean([r["total_s"] for r in rows])),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        r = run_seed(seed, args.patients, args.members, args.trace)
        results.append(r)
        print(f"seed {seed}: D {r['D_prior']:.3f}->{r['D_post']:.3f} ratio {r['D_ratio']:.2f} "
              f"(per patient {', '.join(f'{x:.2f}' for x in r['D_ratio_per_patient'])}); "
              f"rho {r['rho_prior']:.3f}->{r['rho_post']:.3f} ratio {r['rho_ratio']:.2f}; "
              f"90-day volume |err| {r['vol_assim_ml']:.2f} mL (blind {r['vol_blind_ml']:.1f}), "
              f"inside {r['inside']}/{args.patients}; analysis {r['analysis_s'] * 1e3:.0f} ms "
              f"(with advance {r['per_analysis_total_s'] * 1e3:.0f} ms)", flush=True)
    mean = {k: float(np.mean([r[k] for r in results])) for k in ("D_ratio", "rho_ratio", "vol_assim_ml", "analysis_s")}
    print(f"mean over seeds: D ratio {mean['D_ratio']:.2f}, rho ratio {mean['rho_ratio']:.2f}, "
          f"volume |err| {mean['vol_assim_ml']:.2f} mL, analysis {mean['analysis_s'] * 1e3:.0f} ms")
    print(json.dumps({"bench": "identify", "members": args.members, "patients": args.patients,
                      "seeds": results, "mean": mean}))


if __name__ == "__main__":
    main()
