"""`oncotwin demo`: the whole service on one machine, scored against a virtual truth.

A Kafka-protocol broker (the embedded one unless KAFKA_BOOTSTRAP_SERVERS is set), a virtual
cohort written as files and an event log, the log replayed onto the event topics, the faust
normalizer (a child process: faust owns its event loop and signals) turning events into RDF
observations, the assimilation worker (in this process) folding them into twins and publishing
forecasts, and finally a report: forecasts from the end of the observed period against what the
virtual patients really did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from assimilation import Engine, EngineConfig, StateStore, TwinConfig, forecast
from assimilation.experiment import PRESENTING_COHORT
from models import Grid, VISIBLE_THRESHOLD
from models.virtual_patient import CohortConfig, VirtualPatient, generate_patient
from stream import Topics, ensure_broker, ensure_topics
from stream.eventlog import read_events
from stream.replay import replay
from stream.settings import KafkaSettings
from stream.virtual_feed import day0_of, write_cohort
from stream.worker import Worker

HORIZONS = (30.0, 60.0, 90.0, 180.0)


@dataclass(frozen=True)
class DemoConfig:
    patients: int = 3
    seed: int = 20261123
    grid: int = 32
    spacing_mm: float = 3.0
    observe_days: float = 300.0
    members: int = 16
    max_batch: int = 256
    timeout_s: float = 900.0
    idle_s: float = 15.0  # stop after this long without new observations
    # Tumours present as in a clinic (grown untreated to 5-15 mL before the diagnostic MRI) and
    # the twins start from that natural history, learning D and rho from the tumour's edge.
    presentation: bool = True


def cohort_config(config: DemoConfig) -> CohortConfig:
    """The virtual cohort of a demo run."""
    base = CohortConfig(grid=Grid((config.grid,) * 3, (config.spacing_mm,) * 3), observe_days=config.observe_days)
    if not config.presentation:
        return base
    return replace(base, seed_radius_mm=PRESENTING_COHORT.seed_radius_mm,
                   presentation_volume_ml=PRESENTING_COHORT.presentation_volume_ml)


@dataclass(frozen=True)
class Score:
    """One patient's final forecast against the truth at each horizon."""

    patient: str
    horizon: float
    true_volume_ml: float
    median_ml: float
    lo_ml: float
    hi_ml: float
    dice: float
    com_distance_mm: float

    @property
    def covered(self) -> bool:
        return self.lo_ml <= self.true_volume_ml <= self.hi_ml

    @property
    def volume_error_ml(self) -> float:
        return self.median_ml - self.true_volume_ml


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _com(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray | None:
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return None
    return (idx.mean(axis=0) + 0.5) * np.asarray(spacing)


def score_patient(patient: VirtualPatient, fc) -> list[Score]:
    """Scores of the as-planned scenario: volume interval, Dice of the P ≥ 0.5 map against the
    true visible region, centre-of-mass distance (mm)."""
    scores = []
    start = fc.issued_for
    day0 = day0_of(patient)
    for h, days in enumerate(fc.horizons_days):
        t = (start - day0).total_seconds() / 86400.0 + days
        truth_day = min(int(round(t)), len(patient.truth_volume_ml) - 1)
        true_vol = float(patient.truth_volume_ml[truth_day])
        lo, mid, hi = fc.volume_ml[0, h].tolist()
        predicted = fc.prob_visible[0, h].cpu().numpy() >= 0.5
        true_mask = patient.field_at(float(truth_day)).numpy() >= VISIBLE_THRESHOLD
        a, b = _com(predicted, patient.grid.spacing), _com(true_mask, patient.grid.spacing)
        dist = float(np.linalg.norm(a - b)) if a is not None and b is not None else float("nan")
        scores.append(Score(patient.pseudonym, days, true_vol, mid, lo, hi, _dice(predicted, true_mask), dist))
    return scores


class NormalizerProcess:
    """The faust normalizer as a child process, stopped with SIGTERM (it drains and commits)."""

    def __init__(self, kafka: KafkaSettings, imaging_root: Path, data_dir: Path, log_path: Path) -> None:
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap_servers,
            ONCOTWIN_TOPIC_PREFIX=kafka.topic_prefix,
            ONCOTWIN_IMAGING_ROOT=str(imaging_root),
            ONCOTWIN_DATA_DIR=str(data_dir),
            ONCOTWIN_NORMALIZER_WEB_PORT="0",
        )
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.agents"], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def run_demo(out: Path, config: DemoConfig, console: Console) -> tuple[list[VirtualPatient], dict, list[Score]]:
    """Run the service end to end into ``out``; returns patients, final forecasts and scores."""
    out = Path(out).resolve()  # file URIs (the state store) need absolute paths
    cohort_root, data_dir, state_dir = out / "cohort", out / "data", out / "state"
    for d in (cohort_root, data_dir, state_dir):
        d.mkdir(parents=True, exist_ok=True)
    cohort = cohort_config(config)

    kafka, broker = ensure_broker(KafkaSettings.from_env())
    # A fresh topic prefix per run: a shared cluster keeps the topics of earlier demos.
    kafka = replace(kafka, topic_prefix=f"{kafka.topic_prefix}-demo-{config.seed}-{int(time.time())}")
    normalizer = None
    try:
        topics = Topics.from_settings(kafka)
        ensure_topics(kafka, topics)
        console.print(f"broker: {kafka.bootstrap_servers} ({'embedded' if broker else 'external'}), topics {topics.prefix}.*")
        with console.status("simulating virtual patients"):
            patients = [generate_patient(i, config.seed, cohort) for i in range(config.patients)]
            written = write_cohort(patients, cohort_root)
        events = read_events(written.events_path)
        console.print(f"cohort: {len(patients)} patients, {written.n_events} events in {written.events_path}")

        normalizer = NormalizerProcess(kafka, cohort_root, data_dir, out / "normalizer.log")
        sent = replay(kafka, written.events_path)
        if sent.rejected or sent.failed:
            console.print(f"[yellow]replay: {sent.rejected} rejected, {sent.failed} failed[/]")
        console.print(f"replayed {sent.sent} events onto {topics.prefix}.events.*")

        engine = Engine(StateStore(state_dir.as_uri()), EngineConfig(
            n_members=config.members, horizons=HORIZONS, twin=TwinConfig(presentation=config.presentation)))
        worker = Worker(kafka, engine, topics, cohort_root, group_id=f"{topics.prefix}-workers", max_batch=config.max_batch)
        expected = len(events)
        deadline = time.monotonic() + config.timeout_s
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        quiet_since: float | None = None
        try:
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("assimilating events", total=expected)
                while True:
                    outcome = worker.step()
                    s = worker.summary
                    progress.update(task, completed=min(s.records, expected),
                                    description=f"observations in ({s.analyses} analyses, {s.forecasts} forecasts)")
                    now = time.monotonic()
                    # Done when every replayed event reached the worker, or (events the
                    # normalizer dead-lettered never do) when nothing has come for a while.
                    if s.records >= expected:
                        break
                    if outcome.records or s.records == 0:
                        quiet_since = None
                    elif quiet_since is None:
                        quiet_since = now
                    elif now - quiet_since > config.idle_s:
                        break
                    if normalizer.proc.poll() is not None:
                        raise RuntimeError(f"the normalizer exited (code {normalizer.proc.returncode}); see {out / 'normalizer.log'}")
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"demo not finished after {config.timeout_s:g} s: {s.as_dict()}")
        finally:
            worker.close()
        summary = worker.summary
        console.print(f"worker: {summary.records} observations received, {summary.applied} applied, "
                      f"{summary.analyses} analyses, {summary.forecasts} forecasts published, "
                      f"{summary.dead_letters} dead letters")
        if summary.records < expected:
            console.print(f"[yellow]{expected - summary.records} events did not reach the worker: "
                          f"see the dead-letter topic {topics.deadletter} and {out / 'normalizer.log'}[/]")
    finally:
        if normalizer is not None:
            normalizer.stop()
        if broker is not None:
            broker.stop()

    store = StateStore(state_dir.as_uri())
    finals, scores = {}, []
    for p in patients:
        twin = store.latest(p.pseudonym)
        if twin is None:
            continue
        fc = forecast(twin, HORIZONS)
        finals[p.pseudonym] = fc
        scores.extend(score_patient(p, fc))
    return patients, finals, scores


def coverage(scores: list[Score]) -> float:
    return float(np.mean([s.covered for s in scores])) if scores else float("nan")

