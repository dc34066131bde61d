"""Analysis benchmark: batched ETKF and LETKF throughput, against filterpy's EnKF update.

    python -m bench.analysis [--repeats 30] [--filterpy-repeats 3] [--no-filterpy]

ETKF: state n = 4096, N = 32 members, m = 512 direct observations (a different sorted set of
state entries per patient), float32 on the CPU, P = 1, 16, 64 patients in one call; reported as
patient-analyses per second (P / best time of a call; medians are printed too). filterpy: one
``EnsembleKalmanFilter(dim_x=4096, dim_z=512, N=32)`` (its own perturbed-observation update in
float64 numpy, with fx/hx functions), only ``.update`` timed. LETKF: 32^3 and 64^3 fields,
every voxel observed, blocks of 4^3, Gaspari-Cohn radius 6 voxels (zero distance), N = 32,
float32, one patient per call.

The spread diagnostics (a pass over each ensemble, as much as the update itself) are computed
when first read; the "+ spreads" rows read both, the plain rows measure the update alone.

Every call returns a fresh ensemble; at P = 64 that is 32 MiB, which the default allocator
takes from and returns to the kernel, so each call also pays page faults on first touch.
Setting THP_MEM_ALLOC_ENABLE=1 (a PyTorch setting: transparent huge pages for large CPU
tensors) before the run reduces that; the JSON records whether it was set.

Prints a table, then as its last line one JSON object {"bench": "analysis", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def _timings(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """(best, median) wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls.

    The best time is what the code costs when the (shared) cores are free; the median also
    carries other processes' load. Rates and ratios use the best time for both sides.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def bench_etkf(P: int, repeats: int, spreads: bool = False, n: int = 4096, N: int = 32,
               m: int = 512) -> tuple[float, float]:
    """(best, median) seconds of one batched ETKF analysis of P patients (reading the spread
    diagnostics too when ``spreads``)."""
    import torch

    from assimilation import ETKF, Observations

    g = torch.Generator().manual_seed(P)
    X = torch.randn(P, N, n, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(P)])
    obs = Observations(y=torch.randn(P, m, generator=g), r_var=torch.ones(P, m))
    gather = idx[:, None, :].expand(P, N, m)

    def h(Z: torch.Tensor) -> torch.Tensor:
        return torch.gather(Z, 2, gather)

    etkf = ETKF()

    def call() -> None:
        d = etkf.analyse(X, obs, h=h).diagnostics
        if spreads:
            d.spread_prior, d.spread_analysis

    return _timings(call, repeats)


def bench_filterpy(repeats: int, n: int = 4096, N: int = 32, m: int = 512) -> tuple[float, float, float]:
    """(best, median) seconds of EnsembleKalmanFilter.update, and seconds to construct it."""
    import numpy as np
    from filterpy.kalman import EnsembleKalmanFilter

    np.random.seed(0)  # filterpy draws from numpy's global generator
    idx = np.sort(np.random.permutation(n)[:m])
    t0 = time.perf_counter()
    kf = EnsembleKalmanFilter(x=np.zeros(n), P=np.eye(n), dim_z=m, dt=1.0, N=N,
                              hx=lambda x: x[idx], fx=lambda x, dt: x)
    construct = time.perf_counter() - t0
    kf.R = np.eye(m)
    z = np.random.standard_normal(m)
    best, median = _timings(lambda: kf.update(z), repeats, warmup=1)
    return best, median, construct


def bench_letkf(size: int, repeats: int, radius: float = 6.0, N: int = 32) -> tuple[float, float, int]:
    """(best, median) seconds per patient of a full-field LETKF analysis on size^3, and the
    number of observations a central block's analysis uses."""
    import torch

    from assimilation import LETKF, Observations, VoxelGrid
    from assimilation.filters import compact_local, gaspari_cohn

    grid = VoxelGrid((size, size, size), block=4)
    g = torch.Generator().manual_seed(size)
    n = grid.n_state
    X = torch.randn(1, N, n, generator=g)
    axes = [torch.arange(size, dtype=torch.float32)] * 3
    loc = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, n, 3)
    obs = Observations(y=torch.randn(1, n, generator=g), r_var=torch.ones(1, n), locations=loc)
    letkf = LETKF(geometry=grid, radius=radius)
    best, median = _timings(lambda: letkf.analyse(X, obs, h=lambda Z: Z), repeats, warmup=1)
    # How many observations one block's analysis sees (for the table).
    units = grid.units(X.device, X.dtype)
    index = grid.index_observations(loc, torch.ones(1, n, dtype=torch.bool))
    c = grid.blocks_per_axis[0] // 2
    mid = (c * grid.blocks_per_axis[1] + c) * grid.blocks_per_axis[2] + c  # a central block
    idx, dist = grid.candidates(index, units.chunk(mid, mid + 1), radius)
    _, w = compact_local(idx, gaspari_cohn(dist, radius), letkf.min_weight)
    return best, median, int(w.shape[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed ETKF calls per P")
    parser.add_argument("--filterpy-repeats", type=int, default=3, help="timed filterpy updates")
    parser.add_argument("--no-filterpy", action="store_true", help="skip filterpy (~1 min to build)")
    args = parser.parse_args(argv)

    import torch

    result: dict[str, Any] = {"bench": "analysis", "device": "cpu", "dtype": "float32",
                              "threads": torch.get_num_threads(),
                              "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                              "n": 4096, "N": 32, "m": 512}
    rows: list[tuple[str, str, str, str]] = []

    for P in (1, 16, 64):
        best, median = bench_etkf(P, args.repeats)
        rate = P / best
        result[f"etkf_p{P}_per_s"] = round(rate, 1)
        result[f"etkf_p{P}_median_per_s"] = round(P / median, 1)
        rows.append((f"ETKF n=4096 N=32 m=512, P={P}", f"{best * 1e3:.2f} ms", f"{median * 1e3:.2f} ms",
                     f"{rate:.0f} patient-analyses/s"))
        best, median = bench_etkf(P, args.repeats, spreads=True)
        result[f"etkf_p{P}_with_spreads_per_s"] = round(P / best, 1)
        rows.append(("  + spreads read", f"{best * 1e3:.2f} ms", f"{median * 1e3:.2f} ms",
                     f"{P / best:.0f} patient-analyses/s"))

    if not args.no_filterpy:
        best, median, construct = bench_filterpy(args.filterpy_repeats)
        rate = 1.0 / best
        result["filterpy_update_per_s"] = round(rate, 3)
        result["filterpy_update_median_per_s"] = round(1.0 / median, 3)
        result["filterpy_construct_s"] = round(construct, 1)
        rows.append(("filterpy EnsembleKalmanFilter.update", f"{best * 1e3:.1f} ms", f"{median * 1e3:.1f} ms",
                     f"{rate:.2f} patient-analyses/s"))
        for P in (1, 16, 64):
            ratio = result[f"etkf_p{P}_per_s"] / rate
            with_spreads = result[f"etkf_p{P}_with_spreads_per_s"] / rate
            result[f"ratio_p{P}"] = round(ratio, 1)
            result[f"ratio_p{P}_with_spreads"] = round(with_spreads, 1)
            rows.append((f"  ratio ETKF P={P} / filterpy", "", "", f"{ratio:.0f}x ({with_spreads:.0f}x with spreads)"))
        result["ratio_best"] = max(result[f"ratio_p{P}"] for P in (1, 16, 64))
        result["ratio_best_with_spreads"] = max(result[f"ratio_p{P}_with_spreads"] for P in (1, 16, 64))

    for size, repeats in ((32, 5), (64, 3)):
        best, median, k = bench_letkf(size, repeats)
        result[f"letkf_{size}cubed_s_per_patient"] = round(best, 3)
        result[f"letkf_{size}cubed_median_s"] = round(median, 3)
        result[f"letkf_{size}cubed_local_obs"] = k
        rows.append((f"LETKF {size}^3 full field, 4^3 blocks, r=6", f"{best:.3f} s", f"{median:.3f} s",
                     f"{k} obs per local analysis"))

    header = ("case", "best", "median", "rate")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    print(f"analysis benchmark (torch {torch.__version__}, {result['threads']} threads, float32 CPU, "
          f"THP_MEM_ALLOC_ENABLE {'on' if result['thp_mem_alloc'] else 'off'}; rates from the best time)")
    line = "-" * (sum(widths) + 6)
    print(line)
    for row in [header, *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")
    print(line)
    if "ratio_best" in result:
        print(f"best ratio to filterpy's update rate: {result['ratio_best']:.0f}x, "
              f"{result['ratio_best_with_spreads']:.0f}x with spread diagnostics (target >= 3000x)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
