"""The command line a new user meets."""

from __future__ import annotations

import csv

from typer.testing import CliRunner

from oncotwin.cli import app
from oncotwin.settings import ENV_VARS, Settings

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "simulate", "validate", "settings", "produce", "replay", "normalize", "worker", "run",
                    "forecasts", "rehearse", "sparql", "topics"):
        assert command in result.output


def test_settings_defaults_and_overrides(tmp_path):
    default = Settings.from_env({})
    assert default.device == ENV_VARS["ONCOTWIN_DEVICE"][0] and default.dtype == "float32"
    custom = Settings.from_env({"ONCOTWIN_DATA_DIR": str(tmp_path), "ONCOTWIN_DTYPE": "float64"})
    assert custom.state_url == (tmp_path / "state").resolve().as_uri()
    assert custom.imaging_root == tmp_path


def test_settings_lists_every_part_and_hides_secrets(monkeypatch):
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("ONCOTWIN_TWIN_PRESENTATION", "on")
    import oncotwin.cli as cli
    from rich.console import Console

    monkeypatch.setattr(cli, "console", Console(width=300))  # one row per line
    result = runner.invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    for name in ("ONCOTWIN_DEVICE", "KAFKA_BOOTSTRAP_SERVERS", "ONCOTWIN_NORMALIZER_BATCH", "ONCOTWIN_SHACL_ENGINE",
                 "ONCOTWIN_ENSEMBLE_MEMBERS", "ONCOTWIN_TWIN_PRESENTATION"):
        assert name in result.output
    assert "hunter2" not in result.output and "*** (set)" in result.output
    line = next(x for x in result.output.splitlines() if "ONCOTWIN_TWIN_PRESENTATION" in x)
    assert " on " in line


def test_bad_settings_are_reported_not_crashed(monkeypatch):
    monkeypatch.setenv("ONCOTWIN_DTYPE", "float16")
    result = runner.invoke(app, ["settings"])
    assert result.exit_code == 2 and "ONCOTWIN_DTYPE" in result.output


def test_simulate_only_demo_writes_a_report_and_a_valid_log(tmp_path):
    result = runner.invoke(app, ["demo", "--simulate-only", "--patients", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "report" / "summary.csv").open()))
    assert len(rows) == 1 and int(rows[0]["rt_fractions"]) == 30
    pngs = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert len(pngs) == 2 and all((tmp_path / "report" / n).stat().st_size > 10_000 for n in pngs)
    check = runner.invoke(app, ["validate", str(tmp_path / "cohort" / "events.jsonl")])
    assert check.exit_code == 0, check.output


def test_validate_reports_bad_lines(tmp_path):
    log = tmp_path / "bad.jsonl"
    log.write_text('{"kind": "lab"}\nnot json\n')
    result = runner.invoke(app, ["validate", str(log)])
    assert result.exit_code == 1
    assert "bad.jsonl:1" in result.output and "bad.jsonl:2" in result.output
