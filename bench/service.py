"""Service benchmark: event -> forecast latency and patient updates per second of one worker.

    python -m bench.service [--patients 1,10,100] [--grid 32] [--members 32] [--threads 1]

Uses KAFKA_BOOTSTRAP_SERVERS when set, else the embedded tansu broker. One worker (the real
``stream.worker.Worker``, its loop in this process's main thread) consumes a fresh observations topic per
scale; this process publishes normalized observations and reads the forecasts back.

What is timed. For P patients, every twin is first seeded from the patient's first study
straight into the state store (not timed: at 32³ a forecast costs about a second, and seeding
100 twins through the worker would be most of the run). Then rounds: each round publishes one
new observation per patient at once (a lab, ctDNA or MRI result, always an analysis) and waits
until a forecast reflecting every one of them has arrived. An event's latency runs from the
moment it was handed to the producer to the moment its forecast was read back here (Kafka both
ways included). Rounds are bounded to about ``--updates`` patient updates per scale (10 rounds
of 1 patient, 10 of 10, 1 of 100), so the 100-patient scale stays feasible. Patients are clones
of a few generated virtual patients (own pseudonyms and event ids, shared image files).

Latency of a burst of P events includes waiting behind the other P - 1 patients' updates on one
worker: it grows linearly with P by construction. The figure that should stay flat when cost is
linear in patients is the worker's time per patient update (window / updates).

Profile: wall time inside the simulator when advancing members to an observation (simulate),
the EnKF analysis, the forecast to the horizons, the state store, decoding + reading volumes,
and Kafka publishing/committing, from timers wrapped around those functions for the run.

Prints a table, then as its last line one JSON object ({"bench": "service", ...}).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

NAMESPACE = uuid.UUID("5d1e3b9a-7c4f-5e2d-8a6b-0f9e8d7c6b5a")
P99_TARGET_S = 2.0


# -- phase timers ------------------------------------------------------------------------------


class PhaseTimer:
    """Accumulates wall time of wrapped functions by phase (outermost call only per phase)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._depth: dict[tuple[int, str], int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = (threading.get_ident(), phase)
            self._depth[key] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth[key] -= 1
                if self._depth[key] == 0:
                    self.seconds[phase] += time.perf_counter() - start
                    self.calls[phase] += 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def install_timers() -> PhaseTimer:
    import assimilation.engine as engine_mod  # noqa: PLC0415
    import assimilation.twin as twin_mod  # noqa: PLC0415
    import stream.worker as worker_mod  # noqa: PLC0415
    from assimilation.store import StateStore  # noqa: PLC0415

    timer = PhaseTimer()
    timer.wrap(twin_mod, "advance", "simulate")  # members to the observation time
    timer.wrap(twin_mod, "_analyse", "analysis")  # EnKF/LETKF analysis of one time
    timer.wrap(engine_mod, "forecast", "forecast")  # members to the horizons + quantiles
    timer.wrap(worker_mod, "forecast", "forecast")  # (forecasts recovered after a crash)
    for method in ("save", "latest", "load", "journal_put", "journal", "pending", "pending_put", "snapshot_before",
                   "apply_retention", "snapshots"):
        timer.wrap(StateStore, method, "store I/O")
    timer.wrap(worker_mod, "decode_record", "decode")
    timer.wrap(worker_mod, "adapt", "adapt (read volumes)")
    timer.wrap(worker_mod.Worker, "_publish", "kafka publish+flush")
    timer.wrap(worker_mod.Worker, "_commit", "kafka commit")
    return timer


# -- the cohort ----------------------------------------------------------------------------------


@dataclass
class Templates:
    root: Path
    anchors: list[dict]  # the first imaging event of each template patient (raw event)
    rounds: list[list[dict]]  # per template: its analysis events after the first study, in time order


def make_templates(n: int, grid: int, root: Path, days: float) -> Templates:
    from models import Grid  # noqa: PLC0415
    from models.virtual_patient import CohortConfig, generate_cohort  # noqa: PLC0415
    from stream.eventlog import read_events  # noqa: PLC0415
    from stream.virtual_feed import write_cohort  # noqa: PLC0415

    spacing = 96.0 / grid  # the default 32³ grid of 3 mm covers 96 mm
    config = CohortConfig(grid=Grid((grid,) * 3, (spacing,) * 3), observe_days=days, truth_margin_days=1.0)
    written = write_cohort(generate_cohort(n, seed=2026, config=config), root)
    events = read_events(written.events_path)
    anchors, rounds = [], []
    for pid in sorted({e["patient_id"] for e in events}):
        mine = sorted((e for e in events if e["patient_id"] == pid), key=lambda e: (e["occurred_at"], e["event_id"]))
        first = next(e for e in mine if e["kind"] == "imaging")
        anchors.append(first)
        rounds.append([e for e in mine if e["kind"] in ("lab", "ctdna", "imaging") and e["occurred_at"] > first["occurred_at"]])
    return Templates(root, anchors, rounds)


def clone(event: dict, pseudonym: str) -> dict:
    copy = json.loads(json.dumps(event))
    copy["patient_id"] = pseudonym
    copy["event_id"] = str(uuid.uuid5(NAMESPACE, f"{pseudonym}:{event['event_id']}"))
    return copy


def normalize(events: list[dict], root: Path) -> list[Any]:
    """Raw events -> published observations (stream.normalizer), in the given order."""
    from stream.normalizer import Normalizer, NormalizerSettings, SourceRecord  # noqa: PLC0415
    from stream.topics import Topics  # noqa: PLC0415

    topics = Topics("bench-raw")
    normalizer = Normalizer(NormalizerSettings(imaging_root=root), topics)
    sources = [SourceRecord(topics.event_topic(e["kind"]), 0, i, e["patient_id"], json.dumps(e).encode())
               for i, e in enumerate(events)]
    result = normalizer.process(sources)
    if result.dead_letters:
        raise RuntimeError(f"normalizer refused bench events: {[d.reason for d in result.dead_letters[:3]]}")
    by_id = {o.event_id: o for o in result.observations}
    return [by_id[e["event_id"]] for e in events]


# -- one scale -----------------------------------------------------------------------------------


@dataclass
class ScaleResult:
    patients: int
    rounds: int
    updates: int  # forecast records received during the timed window
    window_s: float
    latencies: list[float] = field(default_factory=list)
    seed_s: float = 0.0
    profile: dict[str, float] = field(default_factory=dict)
    worker_stage_s: dict[str, float] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return float(np.percentile(self.latencies, 50)) if self.latencies else float("nan")

    @property
    def p99(self) -> float:
        return float(np.percentile(self.latencies, 99)) if self.latencies else float("nan")

    @property
    def updates_per_s(self) -> float:
        return self.updates / self.window_s if self.window_s > 0 else float("nan")

    @property
    def s_per_update(self) -> float:
        return self.window_s / self.updates if self.updates else float("nan")


def run_scale(kafka: Any, templates: Templates, patients: int, rounds: int, args: argparse.Namespace,
              timer: PhaseTimer, workdir: Path) -> ScaleResult:
    from dataclasses import replace  # noqa: PLC0415

    from assimilation.engine import Engine, EngineConfig  # noqa: PLC0415
    from assimilation.store import StateStore  # noqa: PLC0415
    from assimilation.twin import init_twin  # noqa: PLC0415
    from stream import BatchConsumer, EventProducer, Topics, ensure_topics  # noqa: PLC0415
    from stream.adapt import AdaptConfig, adapt, decode_record  # noqa: PLC0415
    from stream.worker import Worker  # noqa: PLC0415

    prefix = f"bench-svc-{patients}-{uuid.uuid4().hex[:6]}"
    settings = replace(kafka, topic_prefix=prefix, consumer_group=f"{prefix}-workers", topic_partitions=args.partitions)
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    state = workdir / f"state-{patients}"
    config = EngineConfig(n_members=args.members, horizons=tuple(args.horizons), device="cpu")
    engine = Engine(StateStore(state.resolve().as_uri()), config)

    n_templates = len(templates.anchors)
    pseudonyms = [f"BENCH-{patients:03d}-{i:04d}" for i in range(patients)]
    anchors = normalize([clone(templates.anchors[i % n_templates], p) for i, p in enumerate(pseudonyms)], templates.root)
    per_round = []
    for r in range(rounds):
        per_round.append(normalize([clone(templates.rounds[i % n_templates][r], p) for i, p in enumerate(pseudonyms)],
                                   templates.root))

    # Seed every twin from its first study, straight into the store (what the engine does for a
    # first study, without the forecast).
    started = time.perf_counter()
    adapt_config = AdaptConfig(templates.root)
    for obs in anchors:
        study = adapt(decode_record(obs.value), adapt_config, obs.value)
        twin = init_twin(obs.patient_id, study, config.n_members, config.prior, config=config.twin, dtype=config.dtype,
                         device=engine.device, filter_version=engine.filter_version)
        engine.store.journal_put([study])
        engine.store.save(twin)
    seed_s = time.perf_counter() - started

    worker = Worker(settings, engine, topics, templates.root, max_batch=args.max_batch, poll_timeout=0.2)
    reader = BatchConsumer(settings, group_id=f"{prefix}-reader")
    reader.assign(topics.forecasts)
    result = ScaleResult(patients, rounds, 0, 0.0, seed_s=seed_s)
    stop = threading.Event()
    failure: list[BaseException] = []

    def drive() -> None:
        """Publish the rounds and read the forecasts back (light work: a thread of its own)."""
        try:
            deadline = time.monotonic() + 60
            while not worker.assignment():
                if time.monotonic() >= deadline:
                    raise RuntimeError("the worker got no partitions in 60 s")
                reader.poll_batch(100, 0.1)
            timer.reset()
            window_start = time.perf_counter()
            with EventProducer(settings) as producer:
                for batch in per_round:
                    sent_at: dict[str, float] = {}
                    for obs in batch:
                        sent_at[obs.event_id] = time.perf_counter()
                        producer.send(topics.observations, obs.patient_id, obs.value, timestamp_ms=obs.timestamp_ms,
                                      headers=obs.headers)
                    producer.flush(60)
                    waiting = set(sent_at)
                    limit = time.monotonic() + args.round_timeout
                    while waiting:
                        if time.monotonic() >= limit:
                            raise RuntimeError(f"{len(waiting)} events without a forecast after {args.round_timeout} s")
                        for record in reader.poll_batch(500, 0.2):
                            now = time.perf_counter()
                            result.updates += 1
                            for event_id in json.loads(record.value)["based_on_events"]:
                                if event_id in waiting:
                                    waiting.discard(event_id)
                                    result.latencies.append(now - sent_at[event_id])
            result.window_s = time.perf_counter() - window_start
        except BaseException as exc:  # noqa: BLE001  (reported by the main thread)
            failure.append(exc)
        finally:
            stop.set()

    driver = threading.Thread(target=drive, name="bench-driver", daemon=True)
    driver.start()
    # The worker loop runs in the main thread, as `run_worker` runs it in production (torch's
    # intra-op thread pool serves the main thread; another thread would run single-threaded).
    worker.run(stop)
    driver.join(60)
    reader.close()
    if failure:
        raise failure[0]
    result.profile = {k: round(v, 3) for k, v in sorted(timer.seconds.items())}
    return result


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", default="1,10,100", help="patient counts, comma separated")
    parser.add_argument("--grid", type=int, default=32, help="voxels per edge")
    parser.add_argument("--members", type=int, default=32, help="ensemble members")
    parser.add_argument("--horizons", default="30,60,90,180", help="forecast horizons (days)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: robust on a shared machine; OpenMP spins when cores are busy)")
    parser.add_argument("--updates", type=int, default=100, help="patient updates timed per scale (about)")
    parser.add_argument("--max-rounds", type=int, default=10, help="most rounds per scale")
    parser.add_argument("--max-batch", type=int, default=64, help="worker micro-batch size")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--templates", type=int, default=4, help="generated patients the others clone")
    parser.add_argument("--round-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    args.horizons = [float(h) for h in args.horizons.split(",")]
    scales = [int(p) for p in args.patients.split(",")]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)

    from stream import KafkaSettings, ensure_broker  # noqa: PLC0415

    kafka, broker = ensure_broker(KafkaSettings.from_env())
    timer = install_timers()
    results: list[ScaleResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
            workdir = Path(tmp)
            started = time.perf_counter()
            templates = make_templates(min(args.templates, max(scales)), args.grid, workdir / "cohort", days=150.0)
            gen_s = time.perf_counter() - started
            most = min(len(r) for r in templates.rounds)
            for patients in scales:
                rounds = max(1, min(args.max_rounds, most, round(args.updates / patients)))
                print(f"... {patients} patient(s), {rounds} round(s)", file=sys.stderr, flush=True)
                results.append(run_scale(kafka, templates, patients, rounds, args, timer, workdir))
    finally:
        timer.restore()
        if broker is not None:
            broker.stop()

    header = f"{'patients':>8} {'rounds':>6} {'updates':>7} {'p50 s':>8} {'p99 s':>8} {'updates/s':>9} {'s/update':>9} {'seed s':>7}"
    print(f"service bench: {args.grid}^3 voxels, N = {args.members}, horizons {args.horizons} d, cpu, "
          f"{args.threads} torch threads, batch {args.max_batch}; cohort generated in {gen_s:.1f} s")
    print(header)
    for r in results:
        print(f"{r.patients:>8} {r.rounds:>6} {r.updates:>7} {r.p50:>8.2f} {r.p99:>8.2f} {r.updates_per_s:>9.2f} "
              f"{r.s_per_update:>9.2f} {r.seed_s:>7.1f}")
    print("where the time goes (s per scale, timed window):")
    phases = sorted({k for r in results for k in r.profile})
    print(f"{'phase':>24} " + " ".join(f"{r.patients:>8}" for r in results))
    for phase in phases:
        print(f"{phase:>24} " + " ".join(f"{r.profile.get(phase, 0.0):>8.2f}" for r in results))
    print(f"{'window':>24} " + " ".join(f"{r.window_s:>8.2f}" for r in results))

    one = next((r for r in results if r.patients == 1), results[0])
    base, top = results[0], results[-1]
    growth = top.s_per_update / base.s_per_update if base.s_per_update else float("nan")
    summary = {
        "bench": "service",
        "grid": args.grid,
        "members": args.members,
        "horizons_days": args.horizons,
        "device": "cpu",
        "torch_threads": args.threads,
        "max_batch": args.max_batch,
        "scales": [
            {"patients": r.patients, "rounds": r.rounds, "updates": r.updates, "p50_s": round(r.p50, 3),
             "p99_s": round(r.p99, 3), "updates_per_s": round(r.updates_per_s, 3),
             "s_per_update": round(r.s_per_update, 3), "seed_s": round(r.seed_s, 2), "profile_s": r.profile}
            for r in results
        ],
        "p99_single_patient_s": round(one.p99, 3),
        "p99_target_s": P99_TARGET_S,
        "p99_target_met": bool(one.p99 < P99_TARGET_S),
        "s_per_update_growth": round(growth, 3),
        "linear_in_patients": bool(growth < 1.5),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
