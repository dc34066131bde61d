"""``--service``: the cohort's deliveries through the embedded broker and the service's processes.

As ``oncotwin demo`` runs the service: a Kafka-protocol broker (the embedded one unless
KAFKA_BOOTSTRAP_SERVERS is set; a fresh topic prefix per run), the faust normalizer as a child
process (``python -m stream.agents``), the assimilation worker (``stream.worker.Worker``) in this
process, forecasts read back from the forecasts topic and their P(visible) maps from the state
store. Deliveries, downgraded to today's contract, are produced in delivery order (late ones
late, duplicates twice) in rounds that end at each patient's second and cut scans; the worker
works through each round before the next is sent, so the first forecast whose events include a
cut scan is the forecast after it. The calibrated-once baseline runs in-process
(``run.run_patient`` with the service forecasts' start times).
"""

from __future__ import annotations

import gzip
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from assimilation.engine import Engine
from assimilation.store import StateStore
from oncotwin.demo import NormalizerProcess
from schemas import parse_time
from stream.broker import ensure_broker
from stream.eventlog import dumps
from stream.producer import EventProducer, record_headers, timestamp_ms
from stream.settings import KafkaSettings
from stream.subscriber import follow_forecasts
from stream.topics import Topics, ensure_topics
from stream.worker import Worker

from .cohort import Delivery, Patient, Scan, WrittenCohort
from .run import RunConfig, ServicePath, SetResult, downgrade, run_patient

log = logging.getLogger(__name__)

_NAMES = {"volume_ml": "tumor_volume_ml", "ctdna_fraction": "ctdna_tumor_fraction"}


@dataclass(frozen=True)
class RecordForecast:
    """A published forecast record read back, with the interface the scorer uses of
    ``assimilation.forecast.Forecast`` (as-planned scenario only)."""

    record: dict
    prob_visible: torch.Tensor  # [1, H, X, Y, Z]

    @property
    def issued_for(self) -> datetime:
        return parse_time(self.record["analysis_time"])

    @property
    def horizons_days(self) -> tuple[float, ...]:
        return tuple(float(h["days"]) for h in self.record["horizons"])

    def quantity(self, name: str) -> torch.Tensor:
        """[H, 3] (lo, median, hi) of volume_ml, ctdna_fraction or marker."""
        rows = []
        for h in self.record["horizons"]:
            qs = h["quantities"]
            key = _NAMES.get(name) or next(k for k in qs if k.startswith("marker:"))
            rows.append([qs[key]["lo"], qs[key]["median"], qs[key]["hi"]])
        return torch.tensor(rows, dtype=torch.float64)


def _probability_maps(store: StateStore, record: dict) -> torch.Tensor:
    """The record's P(visible) maps, [1, H, X, Y, Z], from its claim check in the state store."""
    import nibabel as nib  # noqa: PLC0415

    claim = record["probability_map_uri"]
    data = store.backend.get_bytes(claim["uri"])
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    image = nib.Nifti1Image.from_bytes(raw)
    maps = np.asarray(image.dataobj, dtype=np.float32)  # [X, Y, Z, H]
    return torch.from_numpy(np.moveaxis(maps, -1, 0).copy())[None]


def _rounds(patients: Sequence[Patient], written: WrittenCohort, dropped: Counter) -> list[list[dict]]:
    """Every patient's downgraded deliveries merged in delivery order, cut after each patient's
    second scan and every later scan (the boundaries of ``run.run_patient``)."""
    items: list[tuple[datetime, str, int, dict, bool]] = []
    for p in patients:
        ds: list[Delivery] = written.deliveries[p.pseudonym]
        scans = sorted((k for k, d in enumerate(ds) if isinstance(d.fact, Scan) and not d.duplicate),
                       key=lambda k: ds[k].fact.t)
        ends = set(scans[1:])
        for k, event in downgrade(ds, dropped):
            items.append((ds[k].delivered_at, event["event_id"], k, event, k in ends))
    items.sort(key=lambda x: (x[0], x[1]))
    rounds, current = [], []
    for _, _, _, event, end in items:
        current.append(event)
        if end:
            rounds.append(current)
            current = []
    if current:
        rounds.append(current)
    return rounds


def run_service_set(patients: Sequence[Patient], written: WrittenCohort, config: RunConfig, dropped: Counter,
                    counts: Counter, seeds: tuple[int, ...], round_timeout_s: float = 600.0,
                    idle_s: float = 5.0) -> SetResult:
    """One seed set through broker, normalizer and worker; returns the scored cuts' forecasts."""
    t0 = time.perf_counter()
    root = Path(written.root).resolve()
    state_dir, data_dir = root / "service-state", root / "service-data"
    for d in (state_dir, data_dir):
        d.mkdir(parents=True, exist_ok=True)
    kafka, broker = ensure_broker(KafkaSettings.from_env())
    kafka = replace(kafka, topic_prefix=f"{kafka.topic_prefix}-osse-{'-'.join(map(str, seeds))}-{int(time.time())}")
    topics = Topics.from_settings(kafka)
    normalizer = producer = None
    records: list[dict] = []
    try:
        ensure_topics(kafka, topics)
        normalizer = NormalizerProcess(kafka, root, data_dir, root / "normalizer.log")
        worker = Worker(kafka, Engine(StateStore(state_dir.as_uri()), config.engine_config()), topics, root,
                        group_id=f"{topics.prefix}-workers", max_batch=256)
        producer = EventProducer(kafka)
        sent: set[str] = set()
        try:
            for events in _rounds(patients, written, dropped):
                for e in events:
                    producer.send(topics.event_topic(e["kind"]), e["patient_id"], dumps(e).encode(),
                                  timestamp_ms=timestamp_ms(parse_time(e["occurred_at"])),
                                  headers=record_headers(event_id=e["event_id"], kind=e["kind"]))
                producer.flush(60)
                sent.update(e["event_id"] for e in events)
                # the normalizer publishes each event once (duplicates it has seen are dropped)
                expected, quiet_since, deadline = len(sent), None, time.monotonic() + round_timeout_s
                while worker.summary.records < expected:
                    outcome = worker.step()
                    now = time.monotonic()
                    if outcome.records:
                        quiet_since = None
                    elif quiet_since is None:
                        quiet_since = now
                    elif now - quiet_since > idle_s:
                        break  # dead-lettered by the normalizer: they never reach the worker
                    if normalizer.proc.poll() is not None:
                        raise RuntimeError(f"the normalizer exited; see {root / 'normalizer.log'}")
                    if now > deadline:
                        raise TimeoutError(f"a round did not reach the worker in {round_timeout_s:g} s")
        finally:
            worker.close()
        s = worker.summary
        counts.update({"service: records to the worker": s.records, "service: applied": s.applied,
                       "service: skipped (already applied)": s.skipped, "service: unsupported": s.unsupported,
                       "service: dead letters at the worker": s.dead_letters, "service: forecasts published": s.forecasts,
                       "service: events not reaching the worker": max(0, len(sent) - s.records)})
        records = list(follow_forecasts(kafka, topics, idle_timeout=3.0))
    finally:
        if producer is not None:
            producer.close(10)
        if normalizer is not None:
            normalizer.stop()
        if broker is not None:
            broker.stop()

    store = StateStore(state_dir.as_uri())
    path = ServicePath(root)
    cuts = []
    for p in patients:
        ds = written.deliveries[p.pseudonym]
        mine = [r for r in records if r["patient_id"] == p.pseudonym and r.get("scenario", "planned") == "planned"]
        scans = sorted((k for k, d in enumerate(ds) if isinstance(d.fact, Scan) and not d.duplicate),
                       key=lambda k: ds[k].fact.t)
        service: dict[int, RecordForecast] = {}
        for k in scans[2:]:
            scan_id = ds[k].event["event_id"]
            first = next((r for r in mine if scan_id in r["based_on_events"]), None)
            if first is None:
                counts["service: cut scans without a forecast"] += 1
                continue
            service[k] = RecordForecast(first, _probability_maps(store, first))
        cuts += run_patient(p, ds, path, config, Counter(), service=service)
    counts["calibrated-once: late treatments not applied"] += path.counts["calibrated-once: late treatments not applied"]
    return SetResult(tuple(seeds), cuts, seconds=time.perf_counter() - t0)

