"""The `oncotwin` command line: the composition root that wires schemas, models and stream."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .settings import Settings

app = typer.Typer(
    help="oncotwin: streaming data assimilation for dynamic cancer digital twins.\n\n"
    "Clinical events (imaging, labs, ctDNA, treatments) flow through Kafka, are normalized to "
    "ontology-tagged RDF, and an ensemble Kalman filter keeps a reaction-diffusion twin of every "
    "patient up to date. Settings come from environment variables: see `oncotwin settings`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _settings() -> Settings:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        console.print(f"[red]settings error:[/] {exc}")
        raise typer.Exit(2) from exc
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings


@app.command("settings")
def show_settings() -> None:
    """Show every setting, its effective value and what it does."""
    from stream.agents import ENV_VARS as AGENT_VARS
    from stream.normalizer import ENV_VARS as NORMALIZER_VARS
    from stream.settings import ENV_VARS as KAFKA_VARS
    from stream.worker import ENV_VARS as WORKER_VARS

    table = Table("for", "variable", "value", "meaning")
    shown = set()
    for name, value, meaning in _settings().as_table():
        table.add_row("all", name, value, meaning)
        shown.add(name)
    for group, variables in (("kafka", KAFKA_VARS), ("normalizer", {**NORMALIZER_VARS, **AGENT_VARS}),
                             ("worker", WORKER_VARS)):
        table.add_section()
        for name, (default, meaning) in variables.items():
            if name not in shown:
                table.add_row(group, name, _shown_value(name, os.environ.get(name, "") or default), meaning)
                shown.add(name)
    console.print(table)


def _shown_value(name: str, value: str) -> str:
    """The value, unless the variable holds a secret."""
    if value and any(word in name for word in ("PASSWORD", "SECRET", "TOKEN")):
        return "*** (set)"
    return value


@app.command()
def simulate(
    out: Path = typer.Option(Path("data/cohort"), "--out", "-o", help="folder for the event log, images and truth"),
    patients: int = typer.Option(3, "--patients", "-n", min=1, help="number of virtual patients"),
    seed: int = typer.Option(None, help="cohort seed (default: ONCOTWIN_SEED)"),
    grid: int = typer.Option(32, help="voxels per side of the simulation grid"),
    spacing: float = typer.Option(3.0, help="voxel size in mm"),
    days: float = typer.Option(300.0, help="days of observations per patient"),
) -> None:
    """Generate a virtual cohort: truth, NIfTI images and a JSONL event log valid against schemas/."""
    from models import Grid
    from models.virtual_patient import CohortConfig

    settings = _settings()
    config = CohortConfig(grid=Grid((grid, grid, grid), (spacing, spacing, spacing)), observe_days=days)
    _generate(out, patients, settings.seed if seed is None else seed, config)


def _generate(out: Path, n: int, seed: int, config):
    """Simulate ``n`` virtual patients of cohort ``config`` and write them under ``out``."""
    from models.virtual_patient import generate_patient
    from stream.virtual_feed import write_cohort

    grid, days = config.grid.shape[0], config.observe_days
    patients = []
    start = time.perf_counter()
    with console.status("") as status:
        for i in range(n):
            status.update(f"simulating virtual patient {i + 1}/{n} ({grid}³ voxels, {days + config.truth_margin_days:.0f} days)")
            patients.append(generate_patient(i, seed, config))
        status.update("writing images and the event log")
        written = write_cohort(patients, out)
    console.print(
        f"[green]wrote[/] {written.n_events} events for {n} patients to {written.events_path} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return patients, written


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="folder for the cohort, state and report"),
    patients: int = typer.Option(3, "--patients", "-n", min=1, help="number of virtual patients"),
    members: int = typer.Option(16, "--members", "-m", min=2, help="ensemble members per twin"),
    seed: int = typer.Option(None, help="cohort seed (default: ONCOTWIN_SEED)"),
    simulate_only: bool = typer.Option(False, "--simulate-only", help="only simulate the cohort and plot its truth"),
    presentation: bool = typer.Option(
        True, "--presentation/--no-presentation",
        help="tumours grown untreated to the diagnostic MRI, twins started from that natural history "
             "(--no-presentation: a seeded blob at day 0 and perturbed-study twins)"),
) -> None:
    """The main job: the whole service on this machine, scored against a virtual truth.

    Starts the embedded Kafka-protocol broker (unless KAFKA_BOOTSTRAP_SERVERS is set), simulates a
    small virtual glioblastoma cohort, replays its event log through the faust normalizer and the
    assimilation worker, and writes a report: forecasts from the end of the observed period
    against the virtual truth (volume error, 95 % interval coverage, Dice, centre-of-mass
    distance) with plots."""
    from .report import plot_maps, plot_trajectories, summary_rows, write_summary

    settings = _settings()
    seed = settings.seed if seed is None else seed
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from .demo import DemoConfig, cohort_config

    config = DemoConfig(patients=patients, seed=seed, members=members, presentation=presentation)
    if simulate_only:
        cohort, written = _generate(out / "cohort", patients, seed, cohort_config(config))
    else:
        from .demo import coverage, run_demo
        from .report import plot_forecast, plot_forecast_maps

        cohort, finals, scores = run_demo(out, config, console)
    figures = []
    for p in cohort:
        figures.append(plot_trajectories(p, report / f"{p.pseudonym}-truth.png"))
        figures.append(plot_maps(p, report / f"{p.pseudonym}-truth-maps.png"))
    rows = summary_rows(cohort)
    write_summary(rows, report)
    if simulate_only:
        columns = {"patient": "patient", "D_mm2_per_day": "D mm²/d", "rho_per_day": "ρ /d", "alpha_per_gy": "α /Gy",
                   "mri": "MRI", "labs": "labs", "volume_day0_ml": "vol₀ mL", "volume_nadir_ml": "nadir mL",
                   "volume_end_ml": "vol day 480 mL"}
        table = Table(*columns.values(), title="virtual cohort (truth)")
        for row in rows:
            table.add_row(*(str(row[c]) for c in columns))
        console.print(table)
    else:
        for pid, fc in finals.items():
            p = next(p for p in cohort if p.pseudonym == pid)
            figures.append(plot_forecast(p, fc, report / f"{pid}-forecast.png"))
            figures.append(plot_forecast_maps(p, fc, report / f"{pid}-forecast-maps.png"))
        table = Table(title="forecasts from the last analysis vs the virtual truth")
        table.add_column("patient", no_wrap=True, min_width=16)
        for column in ("horizon", "true mL", "forecast mL [95 % PI]", "in PI", "Dice", "CoM mm"):
            table.add_column(column)
        lines = ["patient,horizon_days,true_volume_ml,median_ml,lo_ml,hi_ml,covered,dice,com_distance_mm"]
        for sc in scores:
            table.add_row(sc.patient, f"+{sc.horizon:g} d", f"{sc.true_volume_ml:.1f}",
                          f"{sc.median_ml:.1f} [{sc.lo_ml:.1f}, {sc.hi_ml:.1f}]", "yes" if sc.covered else "no",
                          f"{sc.dice:.2f}", f"{sc.com_distance_mm:.1f}")
            lines.append(f"{sc.patient},{sc.horizon:g},{sc.true_volume_ml:.4f},{sc.median_ml:.4f},{sc.lo_ml:.4f},"
                         f"{sc.hi_ml:.4f},{int(sc.covered)},{sc.dice:.4f},{sc.com_distance_mm:.4f}")
        (report / "forecast_scores.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        console.print(table)
        errors = [abs(sc.volume_error_ml) for sc in scores]
        console.print(f"95 % interval coverage {coverage(scores):.2f} over {len(scores)} forecasts; "
                      f"mean |volume error| {sum(errors) / max(1, len(errors)):.1f} mL")
    console.print(f"report: {len(figures)} figures and tables in {report}/ ({time.perf_counter() - start:.0f} s)")


@app.command()
def validate(files: list[Path] = typer.Argument(..., help="JSONL event logs or JSON event files")) -> None:
    """Check events against the contract; print every problem with its line and field."""
    from schemas import validate as validate_event
    from stream.eventlog import read_lines

    bad = total = 0
    for path in files:
        lines = read_lines(path) if path.suffix == ".jsonl" else [(1, path.read_bytes())]
        for number, raw in lines:
            total += 1
            try:
                issues = validate_event(json.loads(raw))
            except json.JSONDecodeError as exc:
                issues = [f"(root): not valid JSON: {exc.msg}"]
            if issues:
                bad += 1
                for issue in issues:
                    console.print(f"{path}:{number}: {issue}")
    console.print(f"{total - bad}/{total} events valid")
    if bad:
        raise typer.Exit(1)


@app.command()
def topics() -> None:
    """Create the service's Kafka topics where missing (idempotent)."""
    from stream import Topics, ensure_broker, ensure_topics
    from stream.settings import KafkaSettings

    _settings()
    kafka, broker = ensure_broker(KafkaSettings.from_env())
    try:
        created = ensure_topics(kafka, Topics.from_settings(kafka))
        console.print(f"created {len(created)} topics: {', '.join(created) or '(all existed)'}")
    finally:
        if broker is not None:
            broker.stop()


@app.command()
def forecasts(
    follow: bool = typer.Option(False, "--follow", "-f", help="keep printing forecasts as they arrive"),
    patient: str = typer.Option(None, "--patient", "-p", help="only this patient pseudonym"),
    quantity: str = typer.Option("tumor_volume_ml", help="quantity to print (tumor_volume_ml, burden, ctdna_tumor_fraction, marker:<LOINC>)"),
    as_json: bool = typer.Option(False, "--json", help="print each forecast record as one JSON line"),
    idle: float = typer.Option(5.0, help="without --follow: stop after this many seconds with nothing new"),
) -> None:
    """Print forecasts from the forecasts topic (needs KAFKA_BOOTSTRAP_SERVERS)."""
    import signal
    import threading

    from stream import Topics
    from stream.settings import KafkaSettings
    from stream.subscriber import follow_forecasts, format_forecast

    _settings()
    kafka = KafkaSettings.from_env()
    if kafka.embedded:
        console.print("[red]no broker:[/] set KAFKA_BOOTSTRAP_SERVERS to the cluster the service publishes to")
        raise typer.Exit(2)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for record in follow_forecasts(kafka, Topics.from_settings(kafka), patient=patient, stop=stop,
                                       idle_timeout=None if follow else idle):
            print(json.dumps(record, sort_keys=True) if as_json else format_forecast(record, quantity), flush=True)
    except KeyboardInterrupt:
        pass


@app.command()
def rehearse(
    patient: str = typer.Option(..., "--patient", "-p", help="patient pseudonym whose twin to use"),
    plan: list[Path] = typer.Option(..., "--plan", help="JSON plan file (see assimilation/plans.py); repeatable"),
    horizons: str = typer.Option("30,60,90,180", help="forecast horizons in days, comma separated"),
    as_json: bool = typer.Option(False, "--json", help="print the forecast records as JSON"),
) -> None:
    """Therapy rehearsal: forecast a patient's twin under alternative treatment plans, side by side."""
    from datetime import datetime, timezone

    from assimilation import StateStore, forecast
    from assimilation.plans import PlanError, plan_from_dict

    settings = _settings()
    store = StateStore(settings.state_url)
    twin = store.latest(patient)
    if twin is None:
        console.print(f"[red]no twin for {patient!r}[/] in {settings.state_url}")
        raise typer.Exit(1)
    plans = {}
    try:
        for path in plan:
            name, events = plan_from_dict(json.loads(path.read_text(encoding="utf-8")), patient)
            plans[name] = events
        hs = tuple(float(h) for h in horizons.split(","))
    except (OSError, ValueError, PlanError) as exc:
        console.print(f"[red]bad plan:[/] {exc}")
        raise typer.Exit(2) from exc
    result = forecast(twin, hs, plans)
    if as_json:
        print(json.dumps(result.to_records(datetime.now(timezone.utc)), indent=1, sort_keys=True))
        return
    table = Table("horizon", "quantity", *result.scenarios, title=f"{patient}: rehearsal from {result.issued_for.isoformat()} (median [95 % PI])")
    for name, label in (("volume_ml", "volume mL"), ("burden_ml", "burden mL"), ("ctdna_fraction", "ctDNA TF")):
        for h, days in enumerate(result.horizons_days):
            cells = []
            for s in range(len(result.scenarios)):
                lo, mid, hi = getattr(result, name)[s, h].tolist()
                cells.append(f"{mid:.3g} [{lo:.3g}, {hi:.3g}]")
            table.add_row(f"+{days:g} d", label, *cells)
    console.print(table)


@app.command()
def worker(
    metrics_port: int = typer.Option(None, help="port of /metrics and /healthz (default ONCOTWIN_WORKER_METRICS_PORT; 0: any)"),
    members: int = typer.Option(None, help="ensemble members per twin (default ONCOTWIN_ENSEMBLE_MEMBERS)"),
    max_batch: int = typer.Option(None, help="most records per micro-batch (default ONCOTWIN_WORKER_MAX_BATCH)"),
) -> None:
    """Run one assimilation worker until SIGTERM: observations in, forecasts out. Start more
    workers (any machine, same KAFKA_BOOTSTRAP_SERVERS and ONCOTWIN_STATE_URL) to scale out."""
    from dataclasses import replace as _replace

    from stream.worker import WorkerSettings, run_worker

    _settings()
    settings = WorkerSettings.from_env()
    overrides = {k: v for k, v in (("metrics_port", metrics_port), ("members", members), ("max_batch", max_batch)) if v is not None}
    summary = run_worker(settings=_replace(settings, **overrides))
    console.print(f"worker stopped: {summary.as_dict()}")


@app.command()
def run(
    metrics_port: int = typer.Option(None, help="worker metrics port (default ONCOTWIN_WORKER_METRICS_PORT)"),
) -> None:
    """Run the service in one command: the normalizer (a child process) and one worker (this
    process), until SIGTERM. In production run `oncotwin normalize` and `oncotwin worker` as
    separate, separately scaled processes instead."""
    import os
    import signal
    import subprocess
    from dataclasses import replace as _replace

    from stream import ensure_broker
    from stream.settings import KafkaSettings
    from stream.worker import WorkerSettings, run_worker

    _settings()
    kafka, broker = ensure_broker(KafkaSettings.from_env())
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers)
    normalizer = subprocess.Popen([sys.executable, "-m", "stream.agents"], env=env)
    try:
        settings = WorkerSettings.from_env()
        if metrics_port is not None:
            settings = _replace(settings, metrics_port=metrics_port)
        if broker is not None:
            console.print(f"embedded broker on {kafka.bootstrap_servers}: point producers at it with KAFKA_BOOTSTRAP_SERVERS")
        summary = run_worker(kafka, settings)
        console.print(f"worker stopped: {summary.as_dict()}")
    finally:
        if normalizer.poll() is None:
            normalizer.send_signal(signal.SIGTERM)
            try:
                normalizer.wait(30)
            except subprocess.TimeoutExpired:
                normalizer.kill()
        if broker is not None:
            broker.stop()


from .ingest_commands import register as _register_ingest  # noqa: E402

_register_ingest(app)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
