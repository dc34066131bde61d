"""The assimilation worker: observations in, one forecast per updated patient out.

    python -m stream.worker            # or `oncotwin worker` (the lead wires the command)

One loop, one thread: poll a micro-batch of ``oncotwin.observations.v1`` (consumer group, manual
commit), decode each record (stream.decode) and adapt it to a typed observation (stream.adapt:
imaging pixels are read through their verified claim checks), hand the batch to the engine
(which batches patients and persists every twin it changes before it returns), publish one
forecast per updated patient to ``oncotwin.forecasts.v1``, flush the producer, and only then
commit the consumed offsets (DESIGN §6).

Effectively-once. Delivery is at least once; the twin records the event ids it applied and the
engine skips them on redelivery, so nothing is applied twice. What a redelivery must not lose
is a forecast: a worker killed after the engine persisted a twin but before its forecast was
acknowledged would, after the restart, find every event applied and the twin "unchanged". So the
worker keeps an outbox marker per patient in the state store (``outbox/forecasts/<pid>.json``:
the digest of the applied ids and the analysis time of the last forecast the brokers
acknowledged); when a batch changes nothing for a patient whose newest twin differs from its
marker, the forecast of that twin is published then. A forecast for an unchanged patient is not
republished; a crash between the flush and the marker write republishes the same forecast (same
``forecast_id``: consumers deduplicate on it).

Bad input never stops the worker: an undecodable record, a claim check that does not resolve
or verify, an unreadable volume, a record keyed by another patient, or a batch the engine fails
on for one patient becomes a dead letter (original bytes, source topic/partition/offset, reason)
and is committed past; so does any record, whatever its bytes, key or headers (a dead letter
always fits in a record: stream.deadletter). Transient failures (the brokers not acknowledging,
the state store failing with an I/O error) do not commit: the worker rewinds to the committed
offsets and does the batch again. A record the brokers refuse for good is not retried: a dead
letter is published bare instead, a forecast record is dropped and logged
(``forecasts_refused``). Logs name records by topic, partition, offset, stage, event id and field
paths, never by a pseudonym or a value (the reasons, which may quote them, are in the dead
letters).

Rebalancing. Offsets are committed before the next poll, and rebalance callbacks run only inside
a poll, so a revocation never finds a processed batch uncommitted. Records fetched in the same
poll that revoked their partition are abandoned (their new owner reads them), and commits are
limited to partitions still assigned. With the eager protocol a partition's new owner starts
only after the old one has rejoined the group, so two workers never work on one patient at
once; the twin follows through the shared store URL.

Shutdown: ``install_signal_handlers`` makes SIGTERM / SIGINT set the stop event; the loop
finishes its batch, commits, closes the consumer (leaving the group, so its partitions move at
once) and the producer, and returns. A batch whose records the brokers do not acknowledge within
``stop_grace_s`` of the stop is given up uncommitted (read again after the restart). Committing
and leaving the group can block for good against brokers that stopped answering: ``run_worker``
ends the process ``stream.shutdown.SHUTDOWN_S`` after the signal if it is still running then
(exit status ``EXIT_SHUTDOWN_TIMEOUT``, as after a crash: the batch in flight stays uncommitted).

Metrics (stream.metrics, a registry per worker): records, each accounted for as an observation,
a dead letter or a duplicate, events by kind and outcome, analyses, dead letters by stage,
forecasts, latencies (event time, record timestamp and fetch to
publication), per-partition consumer lag, stage timings; ``/healthz`` answers 200 while the loop
polls, or works on a batch younger than the poll interval.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import numpy as np
from confluent_kafka import TopicPartition

from assimilation.engine import BatchResult, Engine, EngineConfig
from assimilation.forecast import Forecast, forecast
from assimilation.store import StateStore
from assimilation.twin import PatientTwin, TwinConfig
from schemas import load_schema, validate_forecast
from schemas.times import format_time
from stream.adapt import AdaptConfig, AdaptError, Unsupported, adapt, decode_record
from stream.consumer import BatchConsumer, ConsumerError, Record
from stream.deadletter import DeadLetter, failure_trace
from stream.metrics import MetricsServer, WorkerMetrics
from stream.producer import DeliveryError, DeliveryFailure, EventProducer, Outgoing, record_headers
from stream.settings import KafkaSettings
from stream.shutdown import SHUTDOWN_S, on_signal_delivery, start_deadline
from stream.volumes import nifti_bytes
from stream.topics import Topics, ensure_topics

log = logging.getLogger(__name__)

#: Version of the forecast contract (schemas/json/forecast.json $id), sent as a header.
FORECAST_SCHEMA_VERSION = "1.0"
OUTBOX_PREFIX = "outbox/forecasts/"
MAPS_PREFIX = "maps/"

# name -> (default, help), in the shape of stream.settings.ENV_VARS.
ENV_VARS: dict[str, tuple[str, str]] = {
    "ONCOTWIN_WORKER_MAX_BATCH": ("64", "most observation records the worker takes in one micro-batch"),
    "ONCOTWIN_WORKER_POLL_TIMEOUT_S": ("0.5", "longest a poll waits for the first record of a batch"),
    "ONCOTWIN_WORKER_METRICS_PORT": ("9108", "port of /metrics and /healthz (0: any free port; off: none)"),
    "ONCOTWIN_WORKER_METRICS_HOST": ("127.0.0.1", "address the metrics endpoint listens on"),
    "ONCOTWIN_WORKER_HEALTH_STALE_S": ("60", "/healthz fails when the loop has neither polled nor worked on a batch for this long"),
    "ONCOTWIN_WORKER_MAX_POLL_INTERVAL_S": ("900", "longest batch before the group moves the worker's partitions"),
    "ONCOTWIN_ENSEMBLE_MEMBERS": ("32", "ensemble members per twin"),
    "ONCOTWIN_FORECAST_HORIZONS": ("30,60,90,180", "forecast horizons in days, comma separated"),
    "ONCOTWIN_FILTER": ("etkf", "global filter: etkf (deterministic) or enkf (perturbed observations)"),
    "ONCOTWIN_TWIN_PRESENTATION": (
        "off",
        "on: a new twin grows its members untreated to the first study and learns D/rho from its edge "
        "(not when a delivered treatment precedes the first study; ~9 s per new patient at 32^3, N = 32, 2 CPU threads)",
    ),
    "ONCOTWIN_ANATOMY_FALLBACK": (
        "anatomy.nii.gz",
        "tissue map looked up beside a study's volumes when its event carries none (off: no fallback)",
    ),
}


@dataclass
class WorkerSummary:
    """What a worker did so far (also in its metrics)."""

    batches: int = 0
    records: int = 0
    applied: int = 0
    skipped: int = 0
    unsupported: int = 0
    dead_letters: int = 0
    forecasts: int = 0
    recovered_forecasts: int = 0
    analyses: int = 0
    rewinds: int = 0
    commit_failures: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Item:
    """One consumed record on its way through a batch."""

    record: Record
    event_id: str
    patient_id: str
    kind: str
    time: datetime
    observation: Any


@dataclass
class BatchOutcome:
    records: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    forecasts: list[dict[str, Any]] = field(default_factory=list)
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    unsupported: int = 0  # valid observations without a model: counted, committed past


class _Transient(Exception):
    """A failure worth retrying the batch for (nothing was committed)."""


class _Stopped(Exception):
    """Stopping while the brokers do not acknowledge the batch: it is left uncommitted."""


def probability_map(fc: Forecast, record: Mapping[str, Any]) -> tuple[str, bytes, dict[str, Any]]:
    """(store key, NIfTI bytes, claim check) of a forecast record's P(visible) maps:
    [X, Y, Z, horizon] float32, stored beside the twins. The claim check's URI is the key,
    relative to ONCOTWIN_STATE_URL, so replays into any state store give identical records."""
    s = fc.scenarios.index(record.get("scenario") or fc.scenarios[0])
    maps = np.ascontiguousarray(np.moveaxis(fc.prob_visible[s].detach().cpu().numpy().astype(np.float32), 0, -1))
    data = nifti_bytes(maps, fc.grid_spacing_mm)
    key = f"{MAPS_PREFIX}{quote(fc.patient_id, safe='')}/{record['forecast_id']}.nii.gz"
    claim = {"uri": key, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "format": "nifti"}
    return key, data, claim


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _contract_pattern(name: str) -> re.Pattern[str]:
    """A string pattern of the event contract (schemas/json/envelope.json), for fullmatch."""
    return re.compile(load_schema("envelope")["$defs"][name]["pattern"].removeprefix("^").removesuffix("$"))


# The ids a twin's forecasts carry must be ones the forecast contract takes: an observation with
# others would be applied, and every later forecast of its twin refused, never published.
_EVENT_ID = _contract_pattern("uuid")
_PSEUDONYM = _contract_pattern("pseudonym")


def _digest(event_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(set(event_ids))).encode()).hexdigest()


def _outbox_key(patient_id: str) -> str:
    # Percent-encoded like the store's own keys ("." too, so no name starts with one).
    return f"{OUTBOX_PREFIX}{quote(patient_id, safe='-_')}.json"


class Worker:
    """Consumes observations, drives the engine, publishes forecasts (see the module doc).

    ``engine``: an ``Engine`` or a function returning one (called once, here). ``imaging_root``:
    where claim checks resolve. ``group_id``: the consumer group (default: the settings').
    ``metrics_port``: None serves nothing; 0 any free port (``.metrics_port`` tells which).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        engine: Engine | Callable[[], Engine],
        topics: Topics | None = None,
        imaging_root: Path | str | None = None,
        *,
        group_id: str | None = None,
        max_batch: int = 64,
        poll_timeout: float = 0.5,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        health_stale_s: float = 60.0,
        max_poll_interval_s: float = 900.0,
        anatomy_fallback: str | None = "anatomy.nii.gz",
        flush_timeout: float = 30.0,
        flush_attempts: int = 3,
        retry_pause_s: float = 1.0,
        stop_grace_s: float = 3.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.kafka = kafka
        self.engine: Engine = engine if isinstance(engine, Engine) else engine()
        self.topics = topics or Topics.from_settings(kafka)
        self.adapt_config = AdaptConfig(Path(imaging_root) if imaging_root is not None else None, anatomy_fallback)
        self.group_id = group_id or kafka.consumer_group
        self.max_batch = max_batch
        self.poll_timeout = poll_timeout
        self.health_stale_s = health_stale_s
        self.max_poll_interval_s = max_poll_interval_s
        self.flush_timeout = flush_timeout
        self.flush_attempts = max(1, flush_attempts)
        self.retry_pause_s = retry_pause_s
        # After a stop, what is in flight gets this long before the batch is given up.
        self.stop_grace_s = stop_grace_s
        self._stop = threading.Event()  # run()'s stop event once it runs
        self.clock = clock
        self.metrics = WorkerMetrics()
        self.summary = WorkerSummary()
        self._assigned: set[tuple[str, int]] = set()
        # Per partition: the offset to commit next (last committed, or the first fetched after
        # an assignment) and the highest offset fetched; they feed the lag gauge.
        self._committed: dict[tuple[str, int], int] = {}
        self._fetched: dict[tuple[str, int], int] = {}
        self._closed = False
        self._batch_started: float | None = None  # monotonic start of the batch in progress
        self._producer = EventProducer(kafka)
        self._consumer = self._new_consumer()
        self._metrics_server: MetricsServer | None = None
        if metrics_port is not None:
            self._metrics_server = MetricsServer(self.metrics, self._health, host=metrics_host, port=metrics_port).start()

    # -- clients ---------------------------------------------------------------------------

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server is not None else None

    @property
    def store(self) -> StateStore:
        return self.engine.store

    def _new_consumer(self) -> BatchConsumer:
        consumer = BatchConsumer(
            self.kafka, group_id=self.group_id, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
            # A batch of many patients at 64³ can take minutes between two polls; past this
            # interval the group would expel the worker and move its partitions mid-batch.
            config_overrides={"max.poll.interval.ms": int(self.max_poll_interval_s * 1000)},
        )
        consumer.subscribe([self.topics.observations])
        return consumer

    def _on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self._assigned.update(partitions)
        self.metrics.rebalances.labels("assigned").inc(len(partitions))
        self.metrics.assigned.set(len(self._assigned))
        log.info("assigned %s", sorted(partitions))

    def _on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        # Runs inside a poll: the previous batch is committed already (commit precedes the
        # next poll). Forget the partitions so that records of them fetched in this very poll
        # are abandoned, not processed or committed.
        self._forget(partitions)
        self.metrics.rebalances.labels("revoked").inc(len(partitions))
        log.info("revoked %s", sorted(partitions))

    def _on_lost(self, partitions: list[tuple[str, int]]) -> None:
        self._forget(partitions)
        self.metrics.rebalances.labels("lost").inc(len(partitions))
        log.warning("lost %s (session expired?): their records are another worker's now", sorted(partitions))

    def _forget(self, partitions: list[tuple[str, int]]) -> None:
        self._assigned.difference_update(partitions)
        for tp in partitions:
            self._committed.pop(tp, None)
            self._fetched.pop(tp, None)
        self.metrics.drop_lag(partitions)
        self.metrics.assigned.set(len(self._assigned))

    def assignment(self) -> set[tuple[str, int]]:
        return set(self._assigned)

    # -- health ----------------------------------------------------------------------------

    def _health(self) -> tuple[bool, str]:
        """Healthy while the loop polls regularly, or works on a batch younger than the poll
        interval (beyond it the group has expelled the worker anyway)."""
        since = self.metrics.seconds_since_tick()
        if self._closed:
            return False, "worker closed"
        started = self._batch_started
        if started is not None:
            age = time.monotonic() - started
            if age > self.max_poll_interval_s:
                return False, f"a batch has been running for {age:.0f} s (poll interval {self.max_poll_interval_s:g} s)"
            return True, f"processing a batch for {age:.1f} s; {len(self._assigned)} partition(s) assigned"
        if since > self.health_stale_s:
            return False, f"consumer loop last ticked {since:.1f} s ago (limit {self.health_stale_s:g} s)"
        return True, f"loop ticked {since:.1f} s ago; {len(self._assigned)} partition(s) assigned"

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> WorkerSummary:
        """Process batches until ``stop_event`` is set; then finish, commit and close."""
        self._stop = stop_event
        try:
            while not stop_event.is_set():
                self.step()
        finally:
            self.close()
        return self.summary

    def run_until_idle(self, idle_s: float = 3.0, timeout: float = 120.0,
                       until: Callable[[Worker], bool] | None = None) -> WorkerSummary:
        """Process batches until none came for ``idle_s`` seconds while partitions were
        assigned (or ``until(self)`` holds); raises TimeoutError after ``timeout``. Does not
        close the worker."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while True:
            outcome = self.step()
            now = time.monotonic()
            if until is not None and until(self):
                return self.summary
            if outcome.records or not self._assigned:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            if until is None and quiet_since is not None and now - quiet_since >= idle_s:
                return self.summary
            if now >= deadline:
                raise TimeoutError(f"worker not idle after {timeout:g} s ({self.summary.as_dict()})")

    def step(self) -> BatchOutcome:
        """One poll and, if it brought records, one batch (processed, published, committed)."""
        self.metrics.tick()
        records = self._consumer.poll_batch(self.max_batch, self.poll_timeout)
        self.metrics.tick()
        fetched_at = time.time()
        # Records of partitions revoked during this poll belong to their new owner.
        records = [r for r in records if (r.topic, r.partition) in self._assigned]
        self._note_fetched(records)
        if not records:
            self._update_lag()
            return BatchOutcome()
        self._batch_started = time.monotonic()
        try:
            outcome = self._process(records, fetched_at)
        except _Transient as exc:
            self._rewind(str(exc))
            return BatchOutcome(records=len(records))
        except _Stopped as exc:
            log.warning("stopping: %s; the batch of %d record(s) is left uncommitted", exc, len(records))
            return BatchOutcome(records=len(records))
        finally:
            self._batch_started = None
            self.metrics.tick()
        self._update_lag()
        return outcome

    # -- one batch -------------------------------------------------------------------------

    def _process(self, records: list[Record], fetched_at: float) -> BatchOutcome:
        outcome = BatchOutcome(records=len(records))

        started = time.perf_counter()
        items: list[_Item] = []
        for record in records:
            item = self._admit(record, outcome)
            if item is not None:
                items.append(item)
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - started)

        started = time.perf_counter()
        result = self._assimilate(items, outcome)
        forecasts = list(result.forecasts)
        forecasts += self._recover_unpublished(items, result, {fc.patient_id for fc in forecasts})
        self.metrics.stage_seconds.labels("engine").observe(time.perf_counter() - started)

        started = time.perf_counter()
        published = self._publish(forecasts, outcome)
        publish_time = time.time()
        self.metrics.stage_seconds.labels("publish").observe(time.perf_counter() - started)

        self._write_outbox(published)
        self._account(items, result, published, publish_time, fetched_at, outcome)

        started = time.perf_counter()
        outcome.committed = self._commit(records)
        self.metrics.stage_seconds.labels("commit").observe(time.perf_counter() - started)
        self.metrics.batches.inc()
        self.summary.batches += 1
        return outcome

    def _admit(self, record: Record, outcome: BatchOutcome) -> _Item | None:
        """Decode and adapt one record; a dead letter (or None for unsupported) on failure."""
        decoded = None
        try:
            decoded = decode_record(record.value)
            if not _EVENT_ID.fullmatch(decoded.event_id):
                raise AdaptError("decode", "prov:wasDerivedFrom does not name an event: urn:uuid: and a UUID in "
                                           "lower-case form are expected")
            if not _PSEUDONYM.fullmatch(decoded.patient_id):
                raise AdaptError("decode", "ot:pseudonym is not a pseudonym: 3 to 64 letters, digits, '.', '_' or "
                                           "'-' are expected")
            if record.key is not None and record.key != decoded.patient_id:
                # The key decides the partition, and so which worker owns the patient: a record
                # keyed by someone else could be applied concurrently with that patient's owner.
                raise AdaptError("routing", f"the record key {record.key!r:.80} is not the event's patient pseudonym "
                                            f"{decoded.patient_id!r:.80}")
            observation = adapt(decoded, self.adapt_config, record.value)
        except AdaptError as exc:
            self._dead(record, exc.stage, exc.reason, outcome, decoded)
            return None
        except Unsupported as exc:
            assert decoded is not None
            log.info("unsupported %s event %s (%s[%d]@%d)", exc.kind, decoded.event_id, record.topic, record.partition,
                     record.offset)
            self.metrics.events.labels(decoded.kind, "unsupported").inc()
            self.summary.unsupported += 1
            outcome.unsupported += 1
            return None
        except Exception as exc:  # noqa: BLE001  (a bug must not stop the worker: report it)
            log.error("adapting %s[%d]@%d failed: %s", record.topic, record.partition, record.offset, failure_trace(exc))
            self._dead(record, "internal", f"the worker failed on this record ({type(exc).__name__}: "
                                           f"{str(exc)[:200]}); please report it", outcome, decoded)
            return None
        return _Item(record, decoded.event_id, decoded.patient_id, decoded.kind, decoded.time, observation)

    def _dead(self, record: Record, stage: str, reason: str, outcome: BatchOutcome, decoded: Any = None) -> None:
        dead = DeadLetter(
            stage=stage, reason=reason, topic=record.topic, partition=record.partition, offset=record.offset,
            key=record.key, original=record.value, timestamp_ms=record.timestamp_ms, headers=dict(record.headers),
            event_id=getattr(decoded, "event_id", None) or record.headers.get("event-id"),
            kind=getattr(decoded, "kind", None) or record.headers.get("kind"),
        )
        log.warning("dead letter %s", dead.log_context())
        outcome.dead_letters.append(dead)

    def _assimilate(self, items: list[_Item], outcome: BatchOutcome) -> BatchResult:
        """The engine on the whole batch; if it fails, patient by patient, so that one
        patient's failure dead-letters that patient's records only."""
        if not items:
            return BatchResult([], {})
        try:
            return self.engine.process_batch([i.observation for i in items])
        except OSError as exc:
            raise _Transient(f"state store failure: {failure_trace(exc)}") from exc
        except Exception as exc:  # noqa: BLE001
            log.error("the engine failed on a batch of %d observations (%s); retrying patient by patient", len(items),
                      failure_trace(exc))
        by_patient: dict[str, list[_Item]] = defaultdict(list)
        for item in items:
            by_patient[item.patient_id].append(item)
        forecasts: list[Forecast] = []
        reports = {}
        for pid in sorted(by_patient):
            try:
                result = self.engine.process_batch([i.observation for i in by_patient[pid]])
            except OSError as exc:
                raise _Transient(f"state store failure: {failure_trace(exc)}") from exc
            except Exception as exc:  # noqa: BLE001
                first = by_patient[pid][0].record
                log.error("the engine failed on one patient's %d record(s) (from %s[%d]@%d): %s", len(by_patient[pid]),
                          first.topic, first.partition, first.offset, failure_trace(exc))
                for item in by_patient[pid]:
                    self._dead(item.record, "assimilation", f"the engine failed on this patient's batch "
                                                            f"({type(exc).__name__}: {str(exc)[:200]})", outcome, item)
                continue
            forecasts += result.forecasts
            reports.update(result.reports)
        return BatchResult(forecasts, reports)

    def _recover_unpublished(self, items: list[_Item], result: BatchResult, fresh: set[str]) -> list[Forecast]:
        """Forecasts of twins changed by an earlier delivery whose forecast was never
        acknowledged (a crash between persisting and flushing): see the module doc."""
        out = []
        for pid in sorted({i.patient_id for i in items} - fresh):
            report = result.reports.get(pid)
            if report is None or report.applied or not report.skipped:
                continue  # pending, failed, or nothing redelivered
            try:
                twin = self.store.latest(pid, self.engine.device)
                marker = self._read_outbox(pid)
            except OSError as exc:
                raise _Transient(f"state store failure: {failure_trace(exc)}") from exc
            if twin is None or self._is_published(twin, marker):
                continue
            log.info("republishing a forecast: its twin changed but no forecast of it was acknowledged")
            out.append(self._forecast(twin))
            self.summary.recovered_forecasts += 1
        return out

    def _forecast(self, twin: PatientTwin) -> Forecast:
        cfg = self.engine.config
        plans = cfg.plans(twin) if cfg.plans is not None else None
        return forecast(twin, cfg.horizons, plans, config=cfg.twin)

    @staticmethod
    def _is_published(twin: PatientTwin, marker: Mapping[str, Any] | None) -> bool:
        return (marker is not None and marker.get("applied_digest") == _digest(twin.applied)
                and marker.get("analysis_time") == format_time(twin.time))

    def _read_outbox(self, patient_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.backend.get_bytes(_outbox_key(patient_id)))
        except KeyError:
            return None
        except ValueError:
            return None  # a damaged marker: publishing again is the safe side

    def _write_outbox(self, published: list[Forecast]) -> None:
        for fc in published:
            marker = {"patient_id": fc.patient_id, "analysis_time": format_time(fc.issued_for),
                      "applied_digest": _digest(fc.based_on_events), "written_at": format_time(self.clock())}
            try:
                self.store.backend.put_bytes(_outbox_key(fc.patient_id), json.dumps(marker, sort_keys=True).encode())
            except OSError as exc:
                # The forecast is out; without the marker a redelivery republishes it (same id).
                log.error("cannot write an outbox marker (%s)", failure_trace(exc))

    # -- publishing ------------------------------------------------------------------------

    def _publish(self, forecasts: list[Forecast], outcome: BatchOutcome) -> list[Forecast]:
        """Send forecasts and dead letters, and wait until the brokers acknowledged all."""
        issued_at = self.clock()
        sent: list[tuple[Forecast, Outgoing]] = []
        valid: list[Forecast] = []
        for fc in forecasts:
            records = [self._attach_map(fc, r) for r in fc.to_records(issued_at)]
            problems = [(r, validate_forecast(r)) for r in records]
            bad = [(r, issues) for r, issues in problems if issues]
            if bad:
                # A forecast that breaks its own contract is a bug: never publish it.
                self.metrics.forecasts_invalid.inc(len(bad))
                log.error("a forecast fails the forecast schema, not published (fields %s)",
                          ", ".join(sorted({i.path for i in bad[0][1][:5]})))
                continue
            for record in records:
                sent.append((fc, Outgoing(
                    self.topics.forecasts, fc.patient_id,
                    json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(),
                    timestamp_ms=int(round(fc.issued_for.timestamp() * 1000)),
                    headers=record_headers(schema_version=FORECAST_SCHEMA_VERSION, forecast_id=record["forecast_id"],
                                           scenario=record.get("scenario") or "planned"),
                )))
                outcome.forecasts.append(record)
            valid.append(fc)
        refused = self._deliver([o for _, o in sent], outcome.dead_letters, issued_at)
        unpublished = {id(sent[i][0]) for i in refused}
        published = [fc for fc in valid if id(fc) not in unpublished]
        sent_records = len(sent) - len(refused)
        self.metrics.forecasts.inc(sent_records)
        self.summary.forecasts += sent_records
        for dead in outcome.dead_letters:
            self.metrics.dead_letters.labels(dead.stage).inc()
        self.summary.dead_letters += len(outcome.dead_letters)
        return published

    def _deliver(self, forecasts: list[Outgoing], dead_letters: list[DeadLetter], issued_at: datetime) -> set[int]:
        """Publish forecast records and dead letters until all are acknowledged, retrying only
        what failed; returns the indexes of the forecast records refused for good (dropped,
        logged). A dead letter refused for good is replaced by its bare form. Raises
        ``_Transient`` when ``flush_attempts`` did not get the rest through, ``_Stopped`` when
        the worker stops meanwhile."""
        todo: list[tuple[int, Outgoing | DeadLetter]] = [*enumerate(forecasts), *((-1, d) for d in dead_letters)]
        refused: set[int] = set()
        attempt = 0
        while todo:
            outgoing = [x if isinstance(x, Outgoing) else Outgoing(
                self.topics.deadletter, x.record_key(), x.to_bytes(issued_at), x.record_timestamp_ms, x.record_headers())
                for _, x in todo]
            try:
                outcomes = self._producer.deliver(outgoing, timeout=self.flush_timeout, stop=self._stop,
                                                  grace_s=self.stop_grace_s)
            except DeliveryError as exc:  # the flush itself failed: nothing of it is known acknowledged
                outcomes = [DeliveryFailure(o.topic, None, str(exc)[:200]) for o in outgoing]
            again: list[tuple[int, Outgoing | DeadLetter]] = []
            failures: list[DeliveryFailure] = []
            for (index, item), failure in zip(todo, outcomes):
                if failure is None:
                    continue
                if failure.permanent and isinstance(item, DeadLetter) and not item.bare:
                    again.append((index, item.as_bare(f"this dead letter could not be published whole "
                                                      f"({failure.error}): the original, its headers and the "
                                                      "issues are left out")))
                elif failure.permanent and isinstance(item, Outgoing):
                    # A forecast that can never be published is a bug; retrying cannot help.
                    self.metrics.forecasts_refused.inc()
                    log.error("a forecast record was refused for good, not published: %s", failure.error)
                    refused.add(index)
                else:
                    again.append((index, item))
                    failures.append(failure)
            todo = again
            if not failures:
                continue
            attempt += 1
            self.metrics.delivery_failures.inc()
            log.warning("flush attempt %d/%d: %d record(s) not acknowledged (%s)", attempt, self.flush_attempts,
                        len(failures), "; ".join(sorted({f.error[:200] for f in failures})[:5]))
            if self._stop.is_set():
                raise _Stopped(f"{len(failures)} record(s) not acknowledged")
            if attempt >= self.flush_attempts or self._producer.fatal_error is not None:
                # The batch stays uncommitted; a fresh producer avoids reusing a broken
                # idempotent session.
                try:
                    self._producer.close(timeout=1.0)
                except DeliveryError:
                    pass
                self._producer = EventProducer(self.kafka)
                raise _Transient("the brokers did not acknowledge the batch's forecasts")
            if self._stop.wait(self.retry_pause_s):
                raise _Stopped(f"{len(failures)} record(s) not acknowledged")
        return refused

    def _attach_map(self, fc: Forecast, record: dict[str, Any]) -> dict[str, Any]:
        key, data, claim = probability_map(fc, record)
        self.store.backend.put_bytes(key, data)
        return {**record, "probability_map_uri": claim}

    # -- offsets ---------------------------------------------------------------------------

    def _commit(self, records: list[Record]) -> dict[tuple[str, int], int]:
        offsets: dict[tuple[str, int], int] = {}
        for r in records:
            tp = (r.topic, r.partition)
            if tp in self._assigned:
                offsets[tp] = max(offsets.get(tp, -1), r.offset + 1)
        try:
            done = self._consumer.commit_offsets(offsets)
        except ConsumerError as exc:
            # Most likely a rebalance moved the partitions: their new owner gets the records
            # again and skips them as applied. Nothing is lost.
            self.metrics.commit_failures.inc()
            self.summary.commit_failures += 1
            log.warning("commit failed (records will be redelivered and skipped): %s", exc)
            return {}
        self._committed.update(done)
        return done

    def _note_fetched(self, records: list[Record]) -> None:
        for r in records:
            tp = (r.topic, r.partition)
            self._committed.setdefault(tp, r.offset)  # first fetch after assignment: the group's position
            self._fetched[tp] = max(self._fetched.get(tp, -1), r.offset)

    def _update_lag(self) -> None:
        lags: dict[tuple[str, int], int] = {}
        raw = getattr(self._consumer, "_consumer", None)
        for tp in self._assigned:
            high = self._fetched.get(tp, -1) + 1
            if raw is not None:
                try:
                    # The high watermark of the last fetch response (cached: no request).
                    _, cached_high = raw.get_watermark_offsets(TopicPartition(*tp), cached=True)
                    if cached_high is not None and cached_high >= 0:
                        high = max(high, int(cached_high))
                except Exception:  # noqa: BLE001  (no fetch yet for the partition)
                    pass
            base = self._committed.get(tp)
            if base is None:
                continue  # nothing fetched or committed since the assignment: no honest number
            lags[tp] = high - base
        self.metrics.set_lag(lags)

    def _rewind(self, reason: str) -> None:
        """Forget the uncommitted batch: reconnect at the group's committed offsets."""
        log.warning("rewinding to the committed offsets: %s", reason)
        self.summary.rewinds += 1
        try:
            self._consumer.close()
        except Exception:  # noqa: BLE001
            log.exception("closing the consumer for a rewind failed")
        self._forget(list(self._assigned))
        time.sleep(self.retry_pause_s)
        self._consumer = self._new_consumer()

    # -- accounting ------------------------------------------------------------------------

    def _account(self, items: list[_Item], result: BatchResult, published: list[Forecast], publish_time: float,
                 fetched_at: float, outcome: BatchOutcome) -> None:
        # Each record of the batch is one of: a dead letter, a duplicate (an event applied
        # before, or a second copy in the batch) or an observation (applied, pending, ignored,
        # unsupported).
        self.metrics.records.inc(outcome.records)
        self.summary.records += outcome.records
        dead = {(d.topic, d.partition, d.offset) for d in outcome.dead_letters}
        self.metrics.accounted.labels("dead_letter").inc(len(outcome.dead_letters))
        published_for = {fc.patient_id: set(fc.based_on_events) for fc in published}
        outcome_of: dict[str, str] = {}
        for report in result.reports.values():
            for name, ids in (("applied", report.applied), ("skipped", report.skipped), ("pending", report.pending),
                              ("ignored", tuple(report.ignored))):
                for event_id in ids:
                    outcome_of.setdefault(event_id, name)
            self.metrics.analyses.inc(len(report.analyses))
            self.summary.analyses += len(report.analyses)
        seen: set[str] = set()
        taken = outcome.unsupported
        for item in items:
            if (item.record.topic, item.record.partition, item.record.offset) in dead:
                continue  # its patient failed in the engine: dead-lettered
            name = outcome_of.get(item.event_id)
            if item.event_id in seen:
                name = "skipped"  # a second copy within the batch (the engine deduplicates)
            seen.add(item.event_id)
            if name == "skipped":
                self.metrics.accounted.labels("duplicate").inc()
            else:
                taken += 1
            if name is None:
                continue
            self.metrics.events.labels(item.kind, name).inc()
            if name == "applied":
                self.summary.applied += 1
            elif name == "skipped":
                self.summary.skipped += 1
        self.metrics.accounted.labels("observation").inc(taken)
        for item in items:
            if item.event_id not in published_for.get(item.patient_id, ()):
                continue
            self.metrics.latency_event.observe(max(0.0, publish_time - item.time.timestamp()))
            if item.record.timestamp_ms is not None:
                self.metrics.latency_record.observe(max(0.0, publish_time - item.record.timestamp_ms / 1000.0))
            self.metrics.latency_fetch.observe(max(0.0, publish_time - fetched_at))

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the consumer (leave the group), the producer and the metrics endpoint."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        finally:
            try:
                # Stopping, what was given up must not hold the shutdown for flush_timeout.
                self._producer.close(timeout=self.stop_grace_s if self._stop.is_set() else self.flush_timeout)
            except DeliveryError as exc:
                log.error("closing the producer: %s", exc)
            finally:
                if self._metrics_server is not None:
                    self._metrics_server.stop()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- signals --------------------------------------------------------------------------------


def install_signal_handlers(stop_event: threading.Event, shutdown_s: float | None = None) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stop_event`` (the loop then finishes its batch and leaves the
    group). With ``shutdown_s`` (seconds), the first signal also starts a deadline that ends the
    process ``shutdown_s`` later if it still runs (``stream.shutdown.start_deadline``), even
    while the main thread waits in librdkafka. Returns a function that cancels the deadline
    (the handlers stay). Call from the main thread."""
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("%s: finishing the batch, committing and leaving the group", signal.Signals(signum).name)
        stop_event.set()

    signals = {signal.SIGTERM, signal.SIGINT}
    for signum in signals:
        signal.signal(signum, handler)
    if shutdown_s is None:
        return lambda: None
    lock = threading.Lock()
    deadline: list[threading.Timer | None] = []  # [timer] once started, [None] once disarmed

    def delivered(signum: int) -> None:
        # The watcher's thread: Python handlers wait for the main thread, which a synchronous
        # commit or a close against a frozen broker can hold for good.
        stop_event.set()
        with lock:
            if not deadline:
                deadline.append(start_deadline("worker", shutdown_s))

    stop_watching = on_signal_delivery(signals, delivered)

    def disarm() -> None:
        stop_watching()
        with lock:
            if deadline and deadline[0] is not None:
                deadline[0].cancel()
            deadline[:] = [None]

    return disarm


# -- composition ----------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process needs besides the Kafka settings (read from the environment)."""

    state_url: str
    imaging_root: Path
    members: int = 32
    horizons: tuple[float, ...] = (30.0, 60.0, 90.0, 180.0)
    filter: str = "etkf"
    device: str = "auto"
    dtype: str = "float32"
    max_batch: int = 64
    poll_timeout: float = 0.5
    metrics_port: int | None = 9108
    metrics_host: str = "127.0.0.1"
    health_stale_s: float = 60.0
    max_poll_interval_s: float = 900.0
    anatomy_fallback: str | None = "anatomy.nii.gz"
    presentation: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return (env.get(name, "") or ENV_VARS[name][0]).strip()

        # The shared ONCOTWIN_* names and defaults of oncotwin.settings (not imported: stream
        # sits below oncotwin).
        data_dir = Path(env.get("ONCOTWIN_DATA_DIR", "") or "data")
        state_url = env.get("ONCOTWIN_STATE_URL", "") or (data_dir / "state").resolve().as_uri()
        port_text = get("ONCOTWIN_WORKER_METRICS_PORT").lower()
        try:
            horizons = tuple(float(h) for h in get("ONCOTWIN_FORECAST_HORIZONS").split(",") if h.strip())
            return cls(
                state_url=state_url,
                imaging_root=Path(env.get("ONCOTWIN_IMAGING_ROOT", "") or data_dir),
                members=int(get("ONCOTWIN_ENSEMBLE_MEMBERS")),
                horizons=horizons,
                filter=get("ONCOTWIN_FILTER"),
                device=env.get("ONCOTWIN_DEVICE", "") or "auto",
                dtype=env.get("ONCOTWIN_DTYPE", "") or "float32",
                max_batch=int(get("ONCOTWIN_WORKER_MAX_BATCH")),
                poll_timeout=float(get("ONCOTWIN_WORKER_POLL_TIMEOUT_S")),
                metrics_port=None if port_text in ("off", "none", "-1") else int(port_text),
                metrics_host=get("ONCOTWIN_WORKER_METRICS_HOST"),
                health_stale_s=float(get("ONCOTWIN_WORKER_HEALTH_STALE_S")),
                max_poll_interval_s=float(get("ONCOTWIN_WORKER_MAX_POLL_INTERVAL_S")),
                anatomy_fallback=None if get("ONCOTWIN_ANATOMY_FALLBACK").lower() in ("off", "none")
                else get("ONCOTWIN_ANATOMY_FALLBACK"),
                presentation=_switch("ONCOTWIN_TWIN_PRESENTATION", get("ONCOTWIN_TWIN_PRESENTATION")),
            )
        except ValueError as exc:
            raise ValueError(f"invalid worker setting: {exc}") from exc

    def engine_config(self) -> EngineConfig:
        import torch  # noqa: PLC0415

        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"ONCOTWIN_DTYPE must be float32 or float64, not {self.dtype!r}")
        if not self.horizons or any(not math.isfinite(h) or h <= 0 for h in self.horizons):
            raise ValueError(f"ONCOTWIN_FORECAST_HORIZONS must be positive days, not {self.horizons}")
        return EngineConfig(n_members=self.members, horizons=tuple(sorted(self.horizons)), filter=self.filter,
                            device=self.device, dtype=getattr(torch, self.dtype),
                            twin=TwinConfig(presentation=self.presentation))


def _switch(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no", ""):
        return False
    raise ValueError(f"{name} must be on or off, not {text!r}")


def run_worker(
    kafka: KafkaSettings | None = None,
    settings: WorkerSettings | None = None,
    *,
    engine_config: EngineConfig | None = None,
    group_id: str | None = None,
    stop_event: threading.Event | None = None,
    install_signals: bool = True,
    create_topics: bool = True,
) -> WorkerSummary:
    """Run one worker until SIGTERM / SIGINT (or ``stop_event``): the entry the CLI calls.

    ``kafka`` / ``settings`` default to the environment. With no KAFKA_BOOTSTRAP_SERVERS an
    embedded broker is started for this process (the one-process demo), and stopped at the end.
    """
    from stream.broker import ensure_broker  # noqa: PLC0415

    kafka = kafka or KafkaSettings.from_env()
    settings = settings or WorkerSettings.from_env()
    kafka, broker = ensure_broker(kafka)
    stop_event = stop_event or threading.Event()
    disarm = install_signal_handlers(stop_event, SHUTDOWN_S) if install_signals else (lambda: None)
    try:
        topics = Topics.from_settings(kafka)
        if create_topics:
            ensure_topics(kafka, topics)
        config = engine_config or settings.engine_config()
        engine = Engine(StateStore(settings.state_url), config)
        worker = Worker(
            kafka, engine, topics, settings.imaging_root, group_id=group_id, max_batch=settings.max_batch,
            poll_timeout=settings.poll_timeout, metrics_port=settings.metrics_port, metrics_host=settings.metrics_host,
            health_stale_s=settings.health_stale_s, max_poll_interval_s=settings.max_poll_interval_s,
            anatomy_fallback=settings.anatomy_fallback,
        )
        log.info("worker in group %s on %s (state %s, imaging root %s, %d members, device %s)", worker.group_id,
                 topics.observations, settings.state_url, settings.imaging_root, config.n_members, engine.device)
        summary = worker.run(stop_event)
        log.info("worker stopped: %s", summary.as_dict())
        return summary
    finally:
        if broker is not None:
            broker.stop()
        # Stopped in time: what the caller does next is not the worker's shutdown.
        disarm()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", help="consumer group (default ONCOTWIN_CONSUMER_GROUP)")
    parser.add_argument("--members", type=int, help="ensemble members (default ONCOTWIN_ENSEMBLE_MEMBERS)")
    parser.add_argument("--horizons", help="forecast horizons in days, comma separated")
    parser.add_argument("--max-batch", type=int, help="records per micro-batch")
    parser.add_argument("--metrics-port", help="metrics/health port (0: any free port; off: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ONCOTWIN_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    env = dict(os.environ)
    overrides = {"ONCOTWIN_ENSEMBLE_MEMBERS": args.members, "ONCOTWIN_FORECAST_HORIZONS": args.horizons,
                 "ONCOTWIN_WORKER_MAX_BATCH": args.max_batch, "ONCOTWIN_WORKER_METRICS_PORT": args.metrics_port}
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    run_worker(KafkaSettings.from_env(env), WorkerSettings.from_env(env), group_id=args.group)
    return 0


if __name__ == "__main__":  # pragma: no cover - process entry point
    sys.exit(main())
