"""Forward-model throughput: how many member-days of glioma simulation per second.

Run from the repository root: ``python -m bench.forward``. Prints a table, then as its last
line one JSON object ``{"bench": "forward", ...}``.

Set-up (the realistic case the service runs): a synthetic brain (``synthetic_brain``, seed 0)
on 1 mm voxels, a Gaussian tumour seed (sigma 3 mm, peak 0.8) in white matter, reference HGG
parameters with a +-20 % spread of D and rho across members as in an ensemble, no treatment,
dt = 1 day, float32, default torch threads. Grids 32^3 and 64^3; batches 1, 8, 32; both
schemes. The operator is built once per grid (as the service does for a patient) and its
set-up time is reported separately.

Timing: cost per member-day is T(1 + K days) / (1 + K) / B, minimum over repeats: all-in, the
fixed per-call cost (state compaction, output field) amortised over K = 30 days; that fixed
cost, T(1 day) minus one day's share, is reported as its own column. The yardstick is ``bench.reference_numpy``: the same explicit
scheme in plain NumPy float64, one member, timed the same way in this process.
"""

from __future__ import annotations

import json
import math
import platform
import time

import numpy as np
import torch

from bench.reference_numpy import simulate_reference
from models import (
    DiffusionOperator,
    Grid,
    TumorParams,
    diffusion_weight,
    gaussian_blob,
    simulate,
    synthetic_brain,
)

SIZES = (32, 64)
BATCHES = (1, 8, 32)
SCHEMES = ("explicit", "imex")
DT = 1.0
SPACING = 1.0
K_DAYS = 30         # simulated span per timing (days); the per-day cost includes the fixed cost
REPEATS = 3


def _timed(fn) -> float:
    best = math.inf
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _setup(n: int):
    grid = Grid((n, n, n), (SPACING,) * 3)
    labels = synthetic_brain(grid, torch.Generator().manual_seed(0))
    weight = diffusion_weight(labels).unsqueeze(0)
    center = torch.tensor([[0.42 * n * SPACING, 0.55 * n * SPACING, 0.5 * n * SPACING]])
    u0 = gaussian_blob(grid, center, torch.tensor([3.0]), 0.8) * (weight > 0)
    return grid, labels, weight, u0


def _params(batch: int) -> TumorParams:
    p = TumorParams.reference(batch)
    if batch > 1:
        p.D = p.D * torch.linspace(0.8, 1.2, batch)
        p.rho = p.rho * torch.linspace(1.2, 0.8, batch)
    return p


def bench_numpy(n: int) -> dict:
    grid, _, weight, u0 = _setup(n)
    u = u0[0].double().numpy()
    w = weight[0].double().numpy()

    def run(days: float) -> None:
        simulate_reference(u, w, 0.1, 0.05, grid.spacing, 0.0, days, DT)

    t_short = _timed(lambda: run(1.0))
    t_long = _timed(lambda: run(1.0 + K_DAYS))
    # All-in per day (fixed cost amortised over the span): robust to a loaded machine, where a
    # difference of two timings can come out negative.
    per_day = t_long / (1.0 + K_DAYS)
    return {"n": n, "ms_per_member_day": per_day * 1e3,
            "ns_per_voxel_update": per_day / grid.n_voxels * 1e9,
            "fixed_ms_per_call": max(0.0, t_short - per_day) * 1e3}


def bench_torch(n: int, op: DiffusionOperator, grid: Grid, u0: torch.Tensor, batch: int,
                scheme: str) -> dict:
    ub = u0.expand(batch, -1, -1, -1).contiguous()
    p = _params(batch)
    res = {}

    def run(days: float) -> None:
        res["r"] = simulate(ub, op, p, grid, 0.0, days, dt=DT, scheme=scheme)

    run(1.0)                                   # warm-up
    t_short = _timed(lambda: run(1.0))
    t_long = _timed(lambda: run(1.0 + K_DAYS))
    iters_long = res["r"].cg_iterations
    per_day = t_long / (1.0 + K_DAYS)         # all B members, fixed cost amortised
    steps = res["r"].n_steps
    return {
        "n": n, "batch": batch, "scheme": scheme,
        "ms_per_member_day": per_day / batch * 1e3,
        "member_days_per_s": batch / per_day,
        "voxel_updates_per_s": batch * grid.n_voxels / per_day * DT,
        "ns_per_voxel_update": per_day / (batch * grid.n_voxels) * 1e9,
        "fixed_ms_per_call": max(0.0, t_short - per_day) * 1e3,
        "cg_iters_per_step": iters_long / steps if scheme == "imex" else 0.0,
    }


def check_same_scheme(n: int) -> float:
    """Max |torch float32 - NumPy float64| after 5 days of the explicit scheme."""
    grid, _, weight, u0 = _setup(n)
    ref, _ = simulate_reference(u0[0].double().numpy(), weight[0].double().numpy(), 0.1, 0.05,
                                grid.spacing, 0.0, 5.0, DT)
    got = simulate(u0, weight, TumorParams.reference(1), grid, 0.0, 5.0, dt=DT, scheme="explicit")
    return float(np.abs(got.u[0].double().numpy() - ref).max())


def main() -> None:
    print(f"oncotwin forward benchmark: torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}, float32 vs NumPy float64")
    print(f"synthetic brain, {SPACING:g} mm voxels, dt = {DT:g} day, reference HGG parameters "
          f"(+-20 % D, rho across members), timing = all-in over {1 + K_DAYS} days\n")
    numpy_ref = {n: bench_numpy(n) for n in SIZES}
    agree = {n: check_same_scheme(n) for n in SIZES}
    rows = []
    setup_ms = {}
    tissue = {}
    for n in SIZES:
        grid, labels, weight, u0 = _setup(n)
        t = time.perf_counter()
        op = DiffusionOperator(weight, grid)
        setup_ms[n] = (time.perf_counter() - t) * 1e3
        tissue[n] = op.n_tissue / grid.n_voxels
        for batch in BATCHES:
            for scheme in SCHEMES:
                r = bench_torch(n, op, grid, u0, batch, scheme)
                r["speedup_vs_numpy"] = numpy_ref[n]["ms_per_member_day"] / r["ms_per_member_day"]
                rows.append(r)

    head = (f"{'grid':>5} {'B':>3} {'scheme':>8} {'member-days/s':>14} {'Mvoxel-upd/s':>13} "
            f"{'ms/member-day':>14} {'ns/voxel-upd':>13} {'CG it/step':>10} {'fixed ms/call':>13} "
            f"{'x NumPy':>8}")
    print(head)
    print("-" * len(head))
    for n in SIZES:
        ref = numpy_ref[n]
        print(f"{n:>4}^3 {1:>3} {'numpy64':>8} {1e3 / ref['ms_per_member_day']:>14.1f} "
              f"{grid_voxels(n) / ref['ms_per_member_day'] / 1e3:>13.1f} "
              f"{ref['ms_per_member_day']:>14.3f} {ref['ns_per_voxel_update']:>13.2f} {'-':>10} "
              f"{ref['fixed_ms_per_call']:>13.1f} {1.0:>8.2f}")
        for r in (r for r in rows if r["n"] == n):
            its = f"{r['cg_iters_per_step']:.1f}" if r["scheme"] == "imex" else "-"
            print(f"{n:>4}^3 {r['batch']:>3} {r['scheme']:>8} {r['member_days_per_s']:>14.1f} "
                  f"{r['voxel_updates_per_s'] / 1e6:>13.1f} {r['ms_per_member_day']:>14.3f} "
                  f"{r['ns_per_voxel_update']:>13.2f} "
                  f"{its:>10} "
                  f"{r['fixed_ms_per_call']:>13.1f} {r['speedup_vs_numpy']:>8.2f}")
        print()

    def cost(n: int, b: int, s: str) -> float:
        return next(r["ms_per_member_day"] for r in rows if r["n"] == n and r["batch"] == b
                    and r["scheme"] == s)

    print("How cost grows (ms per member-day):")
    for s in SCHEMES:
        vox = cost(64, 1, s) / cost(32, 1, s)
        print(f"  {s:>8}: 32^3 -> 64^3 (8x voxels, B=1): x{vox:.1f};  per member at 64^3: "
              + ", ".join(f"B={b} {cost(64, b, s):.3f}" for b in BATCHES))
    print(f"  tissue (computed) voxels: {tissue[32]:.0%} of 32^3, {tissue[64]:.0%} of 64^3; "
          f"operator set-up {setup_ms[32]:.0f} ms (32^3), {setup_ms[64]:.0f} ms (64^3), once per map")
    print(f"  same scheme check, 5 days explicit: max |torch f32 - numpy f64| = "
          f"{agree[32]:.1e} (32^3), {agree[64]:.1e} (64^3)")
    best64 = max(r["speedup_vs_numpy"] for r in rows if r["n"] == 64 and r["scheme"] == "explicit")
    worst64 = min(r["speedup_vs_numpy"] for r in rows if r["n"] == 64 and r["scheme"] == "explicit")
    print(f"  explicit at 64^3 vs NumPy float64 single member: x{worst64:.1f} (worst batch) to "
          f"x{best64:.1f} (best batch); target x10")

    summary = {
        "bench": "forward", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": "cpu", "dtype": "float32", "dt_days": DT, "spacing_mm": SPACING,
        "timed_days": 1 + K_DAYS,
        "numpy_reference_ms_per_member_day": {str(n): round(numpy_ref[n]["ms_per_member_day"], 4)
                                              for n in SIZES},
        "results": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                    for r in rows],
        "explicit_speedup_vs_numpy_64": {"min": round(worst64, 2), "max": round(best64, 2)},
        "target_10x_met_64_best_batch": best64 >= 10.0,
        "max_abs_diff_vs_numpy": {str(n): agree[n] for n in SIZES},
        "operator_setup_ms": {str(n): round(setup_ms[n], 1) for n in SIZES},
    }
    print(json.dumps(summary))


def grid_voxels(n: int) -> int:
    return n * n * n


if __name__ == "__main__":
    main()
