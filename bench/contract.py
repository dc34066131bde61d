"""What one `schemas.validate()` costs, with the compiled fast path and without it.

Run from the repository root: ``python -m bench.contract [calls]`` (default 2000 calls per
measurement with the fast path, a tenth of that without). For each example document (the four
event kinds and a forecast) and for an invalid lab event (wrong unit: the fast path says no,
the slow path words the issue), times validate() (validate_forecast() for the forecast) with
the fast path on and off in the same process, best of 5 interleaved repeats; prints a table,
then as its last line one JSON object ``{"bench": "contract", ...}``. Reports, does not assert.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from collections.abc import Callable
from typing import Any

from schemas import EVENT_KINDS, example, fastpath, validate, validate_forecast

REPEATS = 5


def _us_per_call(
    check: Callable[[Any], object], document: Any, calls: dict[bool, int]
) -> dict[bool, float]:
    """Best µs per call with the fast path on (True) and off (False), repeats interleaved so
    that load from other processes weighs on both alike."""
    best = {enabled: float("inf") for enabled in calls}
    for _ in range(REPEATS):
        for enabled, count in calls.items():
            fastpath.ENABLED = enabled
            start = time.perf_counter()
            for _ in range(count):
                check(document)
            best[enabled] = min(best[enabled], (time.perf_counter() - start) / count)
    return {enabled: seconds * 1e6 for enabled, seconds in best.items()}


def _cases() -> list[tuple[str, Callable[[Any], object], Any, bool]]:
    cases: list[tuple[str, Callable[[Any], object], Any, bool]] = [
        (kind, validate, example(kind), True) for kind in EVENT_KINDS
    ]
    cases.append(("forecast", validate_forecast, example("forecast"), True))
    invalid = example("lab")
    invalid["body"]["unit"] = "U/L"
    cases.append(("lab (invalid)", validate, invalid, False))
    return cases


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> None:
    calls = int(argv[0]) if argv else 2000
    fastpath.warm_up()
    saved = fastpath.ENABLED
    rows: dict[str, dict[str, float]] = {}
    print(f"{'document':<14} {'fast µs':>9} {'slow µs':>9} {'slow/fast':>10}")
    try:
        for name, check, document, valid in _cases():
            assert (check(document) == []) == valid, name
            measured = _us_per_call(check, document, {True: calls, False: max(calls // 10, 50)})
            timings = {"fast": measured[True], "slow": measured[False]}
            ratio = timings["slow"] / timings["fast"]
            rows[name] = {
                "fast_us": round(timings["fast"], 2),
                "slow_us": round(timings["slow"], 2),
                "ratio": round(ratio, 1),
            }
            print(f"{name:<14} {timings['fast']:>9.1f} {timings['slow']:>9.1f} {ratio:>9.1f}x")
    finally:
        fastpath.ENABLED = saved
    valid_rows = [r for name, r in rows.items() if name in EVENT_KINDS]
    summary = {
        "bench": "contract",
        "python": platform.python_version(),
        "jsonschema_rs": _version("jsonschema-rs"),
        "calls": calls,
        "repeats": REPEATS,
        "documents": rows,
        "max_fast_us_valid_event": max(r["fast_us"] for r in valid_rows),
        "max_slow_us_valid_event": max(r["slow_us"] for r in valid_rows),
    }
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1:])
