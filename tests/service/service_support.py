"""Helpers of the worker tests: the normalized virtual cohort, a reference run of the engine
without Kafka, publishing observation records, reading forecasts, worker subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from assimilation.engine import Engine, EngineConfig
from assimilation.store import MemoryBackend, StateStore
from assimilation.twin import PatientTwin
from stream import BatchConsumer, EventProducer, KafkaSettings, Record, Topics, read_all
from stream.adapt import AdaptConfig, adapt, decode_record
from stream.worker import probability_map

REPO = Path(__file__).resolve().parents[2]
#: CI-sized: 8 members, two horizons (the worker subprocesses get the same through the env).
ENGINE = EngineConfig(n_members=8, horizons=(30.0, 90.0), device="cpu")
ENGINE_ENV = {"ONCOTWIN_ENSEMBLE_MEMBERS": "8", "ONCOTWIN_FORECAST_HORIZONS": "30,90", "ONCOTWIN_DEVICE": "cpu"}
#: Fixed publication time of reference forecasts (issued_at is the only wall-clock field).
ISSUED = datetime(2030, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class ObservationRecord:
    """One normalized observation as the normalizer publishes it."""

    event_id: str
    patient_id: str
    kind: str
    value: bytes
    headers: dict[str, str]
    timestamp_ms: int


@dataclass(frozen=True)
class Cohort:
    root: Path
    records: list[ObservationRecord]  # in event-time order (the replay order)

    @property
    def patients(self) -> list[str]:
        return sorted({r.patient_id for r in self.records})

    def of(self, patient_id: str) -> list[ObservationRecord]:
        return [r for r in self.records if r.patient_id == patient_id]

    def event_ids(self, patient_id: str | None = None) -> set[str]:
        return {r.event_id for r in self.records if patient_id is None or r.patient_id == patient_id}


def stripped(record: dict[str, Any]) -> dict[str, Any]:
    """A forecast record without its wall-clock publication time."""
    return {k: v for k, v in record.items() if k != "issued_at"}


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(stripped(record), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Reference:
    """One in-order engine run over the whole log, without Kafka."""

    forecasts: dict[str, dict]  # patient -> final forecast record (no issued_at)
    twins: dict[str, PatientTwin]  # patient -> final twin


def reference_run(cohort: Cohort) -> Reference:
    config = AdaptConfig(cohort.root)
    observations = [adapt(decode_record(r.value), config, r.value) for r in cohort.records]
    engine = Engine(StateStore(MemoryBackend()), ENGINE)
    final: dict[str, dict] = {}
    for fc in engine.process_batch(observations).forecasts:
        (record,) = fc.to_records(ISSUED)
        # what the worker adds: the claim check of the stored probability maps
        final[fc.patient_id] = stripped({**record, "probability_map_uri": probability_map(fc, record)[2]})
    twins = {pid: engine.store.latest(pid) for pid in final}
    return Reference(final, twins)  # type: ignore[arg-type]


def publish(settings: KafkaSettings, topics: Topics, records: Iterable[ObservationRecord],
            partition_of: dict[str, int] | None = None) -> int:
    """Send observation records (key = patient, timestamp = event time) and wait for acks."""
    n = 0
    with EventProducer(settings) as producer:
        for r in records:
            producer.send(topics.observations, r.patient_id, r.value, timestamp_ms=r.timestamp_ms, headers=r.headers,
                          partition=None if partition_of is None else partition_of[r.patient_id])
            n += 1
    return n


def forecasts(settings: KafkaSettings, topics: Topics) -> list[Record]:
    return read_all(settings, topics.forecasts, timeout=20.0, idle_timeout=1.0)


def final_forecasts(records: Sequence[Record]) -> dict[str, dict]:
    """The newest forecast per patient (per-partition order is the publication order, and one
    patient's forecasts share a partition)."""
    out: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        doc = json.loads(r.value)
        out[doc["patient_id"]] = stripped(doc)
    return out


def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """Records per partition (read, not ListOffsets: tansu's high watermarks are unreliable)."""
    counts: dict[int, int] = defaultdict(int)
    for r in read_all(settings, topic, timeout=20.0, idle_timeout=1.0):
        counts[r.partition] = max(counts[r.partition], r.offset + 1)
    return dict(counts)


def committed(settings: KafkaSettings, topic: str, group: str) -> dict[int, int]:
    # A consumer that never subscribes does not join the group: it only reads its offsets.
    with BatchConsumer(settings, group_id=group) as c:
        return c.committed(topic, timeout=10.0)


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def start_worker_process(settings: KafkaSettings, state_dir: Path, imaging_root: Path, log_path: Path,
                         *, max_batch: int = 4) -> subprocess.Popen:
    """``python -m stream.worker`` with this test's broker, topics, group and state."""
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        ONCOTWIN_TOPIC_PREFIX=settings.topic_prefix,
        ONCOTWIN_CONSUMER_GROUP=settings.consumer_group,
        ONCOTWIN_TOPIC_PARTITIONS=str(settings.topic_partitions),
        ONCOTWIN_STATE_URL=state_dir.resolve().as_uri(),
        ONCOTWIN_IMAGING_ROOT=str(imaging_root),
        ONCOTWIN_WORKER_MAX_BATCH=str(max_batch),
        ONCOTWIN_WORKER_POLL_TIMEOUT_S="0.2",
        ONCOTWIN_WORKER_METRICS_PORT="off",
        ONCOTWIN_LOG_LEVEL="INFO",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        **ENGINE_ENV,
    )
    log = log_path.open("ab")
    return subprocess.Popen([sys.executable, "-m", "stream.worker"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
