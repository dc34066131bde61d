"""`oncotwin demo` end to end on the embedded broker, CI-sized."""

from __future__ import annotations

import csv

import pytest
from rich.console import Console
from typer.testing import CliRunner

from oncotwin.cli import app
from oncotwin.demo import DemoConfig, coverage, run_demo

pytestmark = pytest.mark.integration


def test_demo_runs_the_service_and_scores_forecasts_against_the_truth(tmp_path, monkeypatch):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    config = DemoConfig(patients=1, seed=5, grid=16, spacing_mm=5.0, observe_days=120.0, members=8, idle_s=8.0)
    patients, finals, scores = run_demo(tmp_path, config, Console(width=120, record=True))
    pid = patients[0].pseudonym
    assert set(finals) == {pid}
    fc = finals[pid]
    # the twin applied the patient's observations and treatments from the log
    assert len(fc.based_on_events) > 30
    assert [s.horizon for s in scores] == [30.0, 60.0, 90.0, 180.0]
    for s in scores:
        assert s.lo_ml <= s.median_ml <= s.hi_ml
        assert 0.0 <= s.dice <= 1.0
    assert 0.0 <= coverage(scores) <= 1.0
    assert (tmp_path / "normalizer.log").stat().st_size > 0


def test_demo_command_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    import oncotwin.demo as demo

    monkeypatch.setattr(demo, "DemoConfig", lambda **kw: DemoConfig(**{**kw, "grid": 16, "spacing_mm": 5.0, "observe_days": 100.0, "idle_s": 8.0}))
    monkeypatch.chdir(tmp_path)  # the default --out is relative, as a new user runs it
    result = CliRunner().invoke(app, ["demo", "--patients", "1", "--members", "8"])
    tmp_path = tmp_path / "demo-out"
    assert result.exit_code == 0, result.output
    report = tmp_path / "report"
    rows = list(csv.DictReader((report / "forecast_scores.csv").open()))
    assert len(rows) == 4 and {r["horizon_days"] for r in rows} == {"30", "60", "90", "180"}
    assert len(list(report.glob("*-forecast.png"))) == 1 and len(list(report.glob("*-forecast-maps.png"))) == 1
    assert "interval coverage" in result.output
