"""python -m bench.osse: the twin against persistence on a cohort richer than the twin.

    python -m bench.osse [--seeds 1] [--heldout-seeds 2] [--patients 4] [--members 16]
                         [--grid 48] [--spacing 2.5] [--observe-days 450] [--no-presentation]
                         [--device cpu] [--service] [--out DIR] [--quick]

``--seeds`` are the tuning seeds (look at them as much as you like), ``--heldout-seeds`` the
seeds nothing is tuned on: both tables are printed, and the targets are judged on the held-out
seeds only. Each seed gives ``--patients`` patients. ``--quick``: 2 patients per seed on 32³
voxels of 2.5 mm, 300 days observed, 8 members (what the test runs). ``--service`` sends the
same deliveries through the embedded broker, the faust normalizer and the worker instead of the
in-process path. Prints the cohort, the facts today's contract could not carry, what the service
did with the rest, the tables, and last one JSON line ``{"bench": "osse", ..., "targets_met": ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from models.grid import Grid

from .cohort import QUICK, CohortConfig, generate_patient, write_cohort
from .run import RunConfig, as_jsonable, cohort_counts, persistence_bands, run_set, score_set, table, targets


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.osse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="tuning seeds (default 1)")
    ap.add_argument("--heldout-seeds", type=int, nargs="+", default=None, help="held-out seeds (default 2)")
    ap.add_argument("--patients", type=int, default=None, help="patients per seed (default 4; quick 2)")
    ap.add_argument("--members", type=int, default=None, help="ensemble members (default 16; quick 8)")
    ap.add_argument("--grid", type=int, default=None, help="voxels per edge (default 48; quick 32)")
    ap.add_argument("--spacing", type=float, default=2.5, help="voxel size, mm")
    ap.add_argument("--observe-days", type=float, default=None, help="observed period (default 450; quick 300)")
    ap.add_argument("--no-presentation", action="store_true", help="twins start from the first study itself")
    ap.add_argument("--device", default="cpu", help="torch device of the twins: cpu, cuda or auto (default cpu)")
    ap.add_argument("--service", action="store_true", help="through the embedded broker and the real processes")
    ap.add_argument("--out", type=Path, default=None, help="where the cohort is written (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="the small configuration the test runs")
    return ap.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[CohortConfig, RunConfig, tuple[int, ...], tuple[int, ...], int]:
    base = QUICK if args.quick else CohortConfig()
    grid_n = args.grid or base.grid.shape[0]
    cohort = replace(base, grid=Grid((grid_n,) * 3, (args.spacing,) * 3),
                     observe_days=args.observe_days or base.observe_days)
    run = RunConfig(members=args.members or (8 if args.quick else 16), presentation=not args.no_presentation,
                    horizons=cohort.horizons, device=args.device)
    seeds = tuple(args.seeds or (1,))
    held = tuple(args.heldout_seeds or (2,))
    if set(seeds) & set(held):
        raise SystemExit(f"a seed cannot be both tuning and held out: {sorted(set(seeds) & set(held))}")
    return cohort, run, seeds, held, args.patients or (2 if args.quick else 4)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    cohort_config, run_config, seeds, held, per_seed = configure(args)
    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="osse-"))
    print(f"cohort: {per_seed} patients per seed, tuning seeds {list(seeds)}, held-out seeds {list(held)}, "
          f"{cohort_config.grid.shape[0]}³ x {cohort_config.grid.spacing[0]:g} mm, {cohort_config.observe_days:g} days "
          f"observed; twin: {run_config.members} members, presentation {'on' if run_config.presentation else 'off'}; "
          f"files in {out}", flush=True)

    dropped: Counter = Counter()
    counts: Counter = Counter()
    results, cohorts = {}, {}
    for name, seed_set in (("tuning", seeds), ("heldout", held)):
        t0 = time.perf_counter()
        patients = [generate_patient(i, s, cohort_config) for s in seed_set for i in range(per_seed)]
        written = write_cohort(patients, out / name)
        cohorts[name] = cohort_counts(patients)
        print(f"{name}: {cohorts[name]} (simulated and written in {time.perf_counter() - t0:.0f} s)", flush=True)
        if args.service:
            from .service import run_service_set  # noqa: PLC0415  (broker only when asked)

            results[name] = run_service_set(patients, written, run_config, dropped, counts, seed_set)
        else:
            results[name] = run_set(patients, written.deliveries, out / name, run_config, dropped, counts, seed_set,
                                    progress=lambda p: print(f"  twin done: patient {p.index} of seed {p.seed}", flush=True))

    bands = persistence_bands(results["tuning"].cuts) if results["tuning"].cuts else None
    for name in results:
        score_set(results[name], bands)

    print("\nfacts today's contract cannot carry (dropped, by kind):")
    for k, v in sorted(dropped.items()):
        print(f"  {k}: {v}")
    if not dropped:
        print("  none: today's contract carries every fact of the cohort's events")
    print("what the service did with the rest:")
    for k, v in sorted(counts.items()):
        print(f"  {k}: {v}")
    print("\nThe twin forecasts one visible volume (u >= 0.16) and P(visible) maps: scored against the true "
          "enhancing and, separately, FLAIR volume and region. Persistence: the last result delivered "
          "(interval: the tuning seeds' 95 % band of truth / last result). Calibrated-once: the twin after the "
          "second scan, then treatments only.")
    for name, title in (("tuning", "TUNING seeds"), ("heldout", "HELD-OUT seeds")):
        print("\n" + table(results[name], run_config.horizons, f"{title} {list(results[name].seeds)}"))
    met = targets(results["heldout"], run_config.horizons)
    print("\ntargets on the held-out seeds:")
    for k, v in met.items():
        print(f"  {'met' if v else 'NOT met'}: {k}")
    summary = {
        "bench": "osse",
        "mode": "service" if args.service else "in-process",
        "grid": list(cohort_config.grid.shape), "spacing_mm": cohort_config.grid.spacing[0],
        "observe_days": cohort_config.observe_days, "members": run_config.members,
        "presentation": run_config.presentation, "patients_per_seed": per_seed,
        "seeds": list(seeds), "heldout_seeds": list(held),
        "cohort": cohorts,
        "dropped_facts": dict(sorted(dropped.items())),
        "service": dict(sorted(counts.items())),
        "tuning": as_jsonable(results["tuning"], run_config.horizons),
        "heldout": as_jsonable(results["heldout"], run_config.horizons),
        "targets": met,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "targets_met": bool(met) and all(met.values()),
    }
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
