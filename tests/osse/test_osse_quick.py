"""`python -m bench.osse --quick` end to end: cohort, service path, scores, the JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.osse.run import EXTENSIONS

REPO = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_both_tables_and_one_json_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.osse", "--quick", "--patients", "1", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["bench"] == "osse" and isinstance(summary["targets_met"], bool)
    assert summary["targets_met"] == all(summary["targets"].values())
    assert "TUNING seeds [1]" in proc.stdout and "HELD-OUT seeds [2]" in proc.stdout
    for name in ("tuning", "heldout"):
        part = summary[name]
        assert part["cuts"] >= 1
        for q in ("enhancing_ml", "flair_ml", "ctdna", "ldh"):
            assert set(part[q]) == {"oncotwin", "persistence", "calibrated-once"}
            assert set(part[q]["oncotwin"]["mdare"]) == {"30", "60", "90", "180"}
        assert 0.0 <= part["enhancing_ml"]["oncotwin"]["dice_30d"] <= 1.0
    # what today's contract cannot carry is counted by kind and field (the list shrinks as it widens)
    for key, n in summary["dropped_facts"].items():
        kind, name = key.split(".", 1)
        assert n > 0 and (name.split(" ")[0] in EXTENSIONS[kind])
    assert summary["service"]["observations to the engine"] > 0
    assert (tmp_path / "heldout" / "events.jsonl").is_file() and (tmp_path / "tuning" / "truth.json").is_file()
