"""Therapy rehearsal from the command line, on a twin persisted by the engine."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from assimilation import Engine, EngineConfig, StateStore
from assimilation.plans import PlanError, plan_from_dict
from oncotwin.cli import app
from schemas import format_time
from twin_support import typed_observations


def test_plan_courses_expand_on_weekdays_and_convert_units():
    name, events = plan_from_dict(
        {"name": "hypo", "courses": [{"kind": "radiotherapy", "start": "2026-03-06T09:00:00+01:00", "count": 5,
                                      "dose": 267, "unit": "cGy"}]},
        "VP-0001",
    )
    assert name == "hypo" and len(events) == 5
    assert {e.time.weekday() for e in events} <= {0, 1, 2, 3, 4}  # Friday, then Mon-Thu
    assert all(e.planned and e.unit == "Gy" and e.dose == pytest.approx(2.67) for e in events)
    with pytest.raises(PlanError, match="furlong"):
        plan_from_dict({"name": "x", "treatments": [{"kind": "radiotherapy", "at": "2026-03-06T09:00:00Z", "dose": 1, "unit": "furlong"}]}, "VP-0001")
    with pytest.raises(PlanError, match="zone"):
        plan_from_dict({"name": "x", "treatments": [{"kind": "chemotherapy", "at": "2026-03-06T09:00:00", "dose": 1, "unit": "mg/m2"}]}, "VP-0001")


def test_rehearse_puts_plans_side_by_side_and_rt_shrinks_the_tumour(patient, tmp_path, monkeypatch):
    state = tmp_path / "state"
    store = StateStore(state.as_uri())
    # the twin as of day 30: before radiotherapy, so a plan can still change the course
    Engine(store, EngineConfig(n_members=8)).process(typed_observations(patient, until=30.0, treatments=False))
    twin = store.latest(patient.pseudonym)
    assert twin is not None
    start = twin.epoch + timedelta(days=twin.clock + 1)
    rt = tmp_path / "rt.json"
    rt.write_text(json.dumps({"name": "rt30x2", "courses": [{"kind": "radiotherapy", "start": format_time(start), "count": 30, "dose": 2, "unit": "Gy"}]}))
    none = tmp_path / "none.json"
    none.write_text(json.dumps({"name": "no-treatment"}))
    monkeypatch.setenv("ONCOTWIN_STATE_URL", state.as_uri())
    runner = CliRunner()
    result = runner.invoke(app, ["rehearse", "--patient", patient.pseudonym, "--plan", str(rt), "--plan", str(none), "--horizons", "60,90", "--json"])
    assert result.exit_code == 0, result.output
    records = {r["scenario"]: r for r in json.loads(result.output)}
    assert set(records) == {"planned", "rt30x2", "no-treatment"}
    vol = {k: r["horizons"][-1]["quantities"]["tumor_volume_ml"]["median"] for k, r in records.items()}
    assert vol["rt30x2"] < vol["no-treatment"]
    table = runner.invoke(app, ["rehearse", "-p", patient.pseudonym, "--plan", str(rt), "--horizons", "90"])
    assert table.exit_code == 0 and "rt30x2" in table.output
    missing = runner.invoke(app, ["rehearse", "-p", "VP-9999-none", "--plan", str(rt)])
    assert missing.exit_code == 1 and "no twin" in missing.output
