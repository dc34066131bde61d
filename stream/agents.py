"""The normalizer as a faust-streaming app: one agent over the four event topics.

    python -m stream.agents            # or `oncotwin normalize`

The agent reads micro-batches (``stream.take_events(n, within=...)``) of raw records from
``oncotwin.events.{imaging,lab,ctdna,treatment}.v1`` and hands each batch to a worker thread
that runs ``stream.normalizer`` and then, in this order:

1. publishes each observation (JSON-LD, key = patient pseudonym, headers, timestamp = event
   time) to ``oncotwin.observations.v1`` and each dead letter to ``oncotwin.deadletter.v1``,
   and waits until the brokers acknowledged every record (retrying what was not acknowledged,
   never dropping; an observation the brokers refuse for good, too large or with an event time
   a record cannot carry, becomes a dead letter instead);
2. adds the observations' graphs to the RDF store and marks them stored (the durable seen-set
   that makes duplicates produce one observation);
3. acknowledges the batch's events to faust once the graphs are stored: offsets are committed
   only for records whose outcome is durable. Storing runs in a thread of its own while the
   next batch is normalized. A crash between 1 and 2 republishes the batch's observations after
   the restart (at-least-once); consumers deduplicate on the event id.

Duplicates. A record whose event id was published before is a duplicate; the digest of its
content (``content_digest``) is compared with the one kept with the event's marker in the store.
The same content is a redelivery, skipped and counted; other content under a used event id (a
correction sent under the old id, another patient's event) is a dead letter of stage
``duplicate``, never silently dropped. Every record handled is counted as exactly one of an
observation, a dead letter or a duplicate (``Counters``, the ``/normalizer/stats`` page).

Logs name records by topic, partition, offset, stage, event id and field paths only, never by a
value they hold: the reasons, which quote values, are in the dead letters.

Shutdown. SIGTERM or SIGINT first tells the service to stop publishing (a batch the brokers do
not acknowledge within seconds is given up uncommitted, and read again after the restart), then
faust stops; ``NormalizerService.close`` returns within its timeout, and should faust itself
hang (brokers gone: leaving the group, committing), the process exits once ``SHUTDOWN_S`` have
passed since the signal, as after a crash.

Records are published with confluent-kafka (librdkafka) rather than faust's aiokafka producer:
it is several times cheaper per record, and ``flush`` tells exactly whether all were delivered.

The worker also answers SPARQL over the store at ``http://HOST:PORT/sparql?query=...`` (faust's
web server; Oxigraph admits one writer per store directory, so while the normalizer runs this
is how others query it).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import gc
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError

from stream.consumer import Record
from stream.deadletter import DeadLetter, Issue, failure_trace
from stream.normalizer import BatchResult, Normalizer, NormalizerSettings, Observation, SourceRecord
from stream.producer import DeliveryError, DeliveryFailure, EventProducer, Outgoing
from stream.rdfstore import RdfStore
from stream.settings import KafkaSettings
from stream.shutdown import EXIT_SHUTDOWN_TIMEOUT, SHUTDOWN_S, start_deadline  # noqa: F401  (the first two re-exported)
from stream.topics import Topics, ensure_topics

log = logging.getLogger(__name__)

# name -> (default, help), in the shape of stream.settings.ENV_VARS.
ENV_VARS: dict[str, tuple[str, str]] = {
    "ONCOTWIN_NORMALIZER_BATCH": ("500", "most records the normalizer handles in one micro-batch"),
    "ONCOTWIN_NORMALIZER_WITHIN_S": ("0.05", "longest a micro-batch waits to fill (latency under low load)"),
    "ONCOTWIN_NORMALIZER_STORE_EVENTS": ("2000", "events the RDF store gathers per load while a backlog lasts (bigger loads cost less per event)"),
    "ONCOTWIN_NORMALIZER_STORE_WITHIN_S": ("1.0", "longest the RDF store waits to gather them (delays offset commits, not publishing)"),
    "ONCOTWIN_NORMALIZER_WEB_PORT": ("6066", "port of the normalizer's SPARQL endpoint (0: no web server)"),
    "ONCOTWIN_NORMALIZER_WEB_HOST": ("127.0.0.1", "address the SPARQL endpoint listens on"),
}


@dataclass(frozen=True)
class AgentSettings:
    batch_size: int = 500
    batch_within_s: float = 0.05
    store_events: int = 2000
    store_within_s: float = 1.0
    web_port: int = 6066  # 0 disables the web server
    web_host: str = "127.0.0.1"
    data_dir: Path = Path("data")

    @property
    def store_path(self) -> Path:
        return self.data_dir / "rdf"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AgentSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return (env.get(name, "") or ENV_VARS[name][0]).strip()

        return cls(
            batch_size=max(1, int(get("ONCOTWIN_NORMALIZER_BATCH"))),
            batch_within_s=max(0.001, float(get("ONCOTWIN_NORMALIZER_WITHIN_S"))),
            store_events=max(1, int(get("ONCOTWIN_NORMALIZER_STORE_EVENTS"))),
            store_within_s=max(0.0, float(get("ONCOTWIN_NORMALIZER_STORE_WITHIN_S"))),
            web_port=int(get("ONCOTWIN_NORMALIZER_WEB_PORT")),
            web_host=get("ONCOTWIN_NORMALIZER_WEB_HOST"),
            data_dir=Path(env.get("ONCOTWIN_DATA_DIR", "") or "data"),
        )


@dataclass
class Counters:
    """What the normalizer handled. Each record of a handled batch is one of an observation
    published, a dead letter published or a duplicate skipped, so that
    records == observations + dead_letters + duplicates."""

    records: int = 0
    observations: int = 0
    dead_letters: int = 0
    duplicates: int = 0  # event id published before with the same content: skipped
    conflicts: int = 0  # event id published before with other content: dead letters of stage duplicate
    undeliverable: int = 0  # observations the brokers refused for good: dead letters instead
    abandoned: int = 0  # batches given up at shutdown, uncommitted (read again after the restart)
    batches: int = 0
    stored: int = 0  # observations whose graphs are stored (durable), duplicates of stored ones too
    by_stage: dict[str, int] = field(default_factory=dict)

    def add(self, result: BatchResult, records: int) -> None:
        self.records += records
        self.batches += 1
        self.observations += len(result.observations)
        self.dead_letters += len(result.dead_letters)
        self.duplicates += len(result.duplicates)
        for dead in result.dead_letters:
            self.by_stage[dead.stage] = self.by_stage.get(dead.stage, 0) + 1


class Abandoned(RuntimeError):
    """A batch given up because the service is closing: none of it is committed, so all of it
    is read again after the restart."""


def content_digest(value: bytes | None) -> str:
    """SHA-256 (hex) of a record's JSON value in canonical form (keys sorted, no blanks): records
    carrying the same JSON value have the same digest however they are laid out. A value that
    is not strict JSON is hashed as its bytes."""
    try:
        canonical = orjson.dumps(orjson.loads(value or b""), option=orjson.OPT_SORT_KEYS)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError):
        canonical = value or b""
    return hashlib.sha256(canonical).hexdigest()


class NormalizerService:
    """The Kafka- and store-facing side of the normalizer, independent of faust.

    ``handle`` normalizes and publishes a batch in the caller's thread and hands the graphs to
    a store-writer thread (Oxigraph loads without the GIL), so that storing batch k overlaps
    normalizing batch k+1. A batch is durable once its graphs are stored and marked;
    ``on_durable`` tells the caller when, and only then may its offsets be committed. The store
    writer gathers ``store_events`` events (waiting at most ``store_within_s``) per load; at
    most ``max_unstored`` events wait for the store. Events published but not yet marked count
    as seen, so a duplicate in the next batch is still caught. ``stop`` (and ``close``) set a
    flag that publishing watches: a batch that cannot be acknowledged is given up (``Abandoned``).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        normalizer: Normalizer,
        store: RdfStore,
        *,
        retry_pause_s: float = 1.0,
        store_events: int = 1,
        store_within_s: float = 0.0,
        max_unstored: int = 20_000,
        stop_grace_s: float = 2.0,
    ) -> None:
        self.kafka = kafka
        self.topics = normalizer.topics
        self.normalizer = normalizer
        self.store = store
        self.counters = Counters()
        self.retry_pause_s = retry_pause_s
        self.max_unstored = max(1, max_unstored, store_events)
        # Once stopped, records in flight get this long before the batch is given up.
        self.stop_grace_s = stop_grace_s
        self._stop = threading.Event()
        self._producer = EventProducer(kafka)
        self._lock = threading.Lock()
        self._store_writer = StoreWriter(self._store, min_events=store_events, within_s=store_within_s)
        # (future, events) of the batches handed to the store writer and not yet stored
        self._unstored: collections.deque[tuple[concurrent.futures.Future[None], int]] = collections.deque()
        self._unstored_events = 0
        # event id -> content digest of the events published and not yet marked in the store
        self._unmarked: dict[str, str] = {}
        self._unmarked_lock = threading.Lock()

    def handle(self, records: Sequence[SourceRecord], on_durable: Callable[[], None] | None = None) -> BatchResult:
        """Normalize, publish (until acknowledged), then store in the background. Runs in one
        worker thread; raises if storing an earlier batch failed (that batch never becomes
        durable, so it is read again after a restart), and ``Abandoned`` once ``stop`` or
        ``close`` was called. Returns what was published: the observations, the dead letters (those made
        at publishing too) and the duplicates skipped."""
        with self._lock:
            if self._stop.is_set():
                raise Abandoned("the normalizer is closing")
            self._check_store()
            result, digests = self._judge_duplicates(self.normalizer.process(records, seen=self._seen))
            try:
                observations, dead_letters, undeliverable = self._publish(result.observations, result.dead_letters)
            except Abandoned:
                self.counters.abandoned += 1
                raise
            result = BatchResult(observations, dead_letters, result.duplicates)
            graphs = [(o.event_id, o.ntriples) for o in observations]
            with self._unmarked_lock:
                self._unmarked.update((o.event_id, digests[o.event_id]) for o in observations)
            while self._unstored and self._unstored_events + len(graphs) > self.max_unstored:
                self._store_writer.hurry()
                self._wait_oldest()
            self._unstored.append((self._store_writer.submit(graphs, on_durable), len(graphs)))
            self._unstored_events += len(graphs)
            self.counters.add(result, len(records))
            self.counters.undeliverable += undeliverable
            self.counters.conflicts += sum(d.stage == "duplicate" for d in dead_letters)
            for dead in dead_letters:
                log.warning("dead letter %s", dead.log_context())
            if result.duplicates:
                log.info("skipped %d duplicate event(s) already published with the same content", len(result.duplicates))
            return result

    def _judge_duplicates(self, result: BatchResult) -> tuple[BatchResult, dict[str, str]]:
        """Tell a redelivered copy (the content published first, or an old marker without a
        digest: a duplicate) from another record under a used event id (a dead letter of stage
        duplicate). Returns the batch to publish and the content digest of its observations."""
        observations, dead_letters = list(result.observations), list(result.dead_letters)
        duplicates: list[tuple[str, SourceRecord]] = []
        digests = {o.event_id: content_digest(o.source.value) for o in observations}
        for event_id, record in result.duplicates:
            digest = content_digest(record.value)
            published, first = (True, digests[event_id]) if event_id in digests else self._published_digest(event_id)
            if not published:
                # Its first copy in this batch was dead-lettered (its RDF failed): this copy is
                # judged on its own rather than dropped with it.
                again = self.normalizer.process([record], seen=self._seen)
                digests.update((o.event_id, content_digest(o.source.value)) for o in again.observations)
                observations += again.observations
                dead_letters += again.dead_letters
                duplicates += again.duplicates
            elif first is None or first == digest:
                duplicates.append((event_id, record))
            else:
                dead_letters.append(DeadLetter(
                    stage="duplicate", reason="event_id already used with different content",
                    topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
                    original=record.value, timestamp_ms=record.timestamp_ms, headers=dict(record.headers),
                    issues=(Issue("event_id", f"sha256 of the content published first: {first}"),
                            Issue("event_id", f"sha256 of this record's content: {digest}")),
                    event_id=event_id, kind=self.topics.kind_of(record.topic),
                ))
        return BatchResult(observations, dead_letters, duplicates), digests

    def _published_digest(self, event_id: str) -> tuple[bool, str | None]:
        """(whether the event was published, the digest of its content where known)."""
        with self._unmarked_lock:
            if event_id in self._unmarked:
                return True, self._unmarked[event_id]
        # Marked before it leaves _unmarked (see _store): no moment where it is in neither.
        if self.store.contains_event(event_id):
            return True, self.store.digest(event_id)
        return False, None

    def _seen(self, event_id: str) -> bool:
        with self._unmarked_lock:
            if event_id in self._unmarked:
                return True
        return self.store.contains_event(event_id)

    def _store(self, graphs: list[tuple[str, str]]) -> None:
        # Marked only after the batches were published (handle publishes first): a crash
        # before the marks republishes them rather than losing them.
        written = self.store.write(graphs)
        with self._unmarked_lock:
            digests = {eid: self._unmarked.get(eid) for eid in written}
        self.store.mark(written, digests)
        with self._unmarked_lock:
            for eid, _ in graphs:
                self._unmarked.pop(eid, None)
        self.counters.stored += len(graphs)  # only this thread writes it

    def store_now(self) -> None:
        """Store what waits for the store without gathering more (the input is idle)."""
        self._store_writer.hurry()

    def _wait_oldest(self) -> None:
        future, events = self._unstored.popleft()
        self._unstored_events -= events
        future.result()  # re-raises a failure of the store writer

    def _check_store(self) -> None:
        while self._unstored and self._unstored[0][0].done():
            self._wait_oldest()

    def drain(self) -> None:
        """Wait until every handled batch is stored (and reported durable)."""
        with self._lock:
            self._store_writer.hurry()
            while self._unstored:
                self._wait_oldest()

    def _publish(
        self, observations: Sequence[Observation], dead_letters: Sequence[DeadLetter]
    ) -> tuple[list[Observation], list[DeadLetter], int]:
        """Publish until the brokers acknowledged every record; returns the observations and
        the dead letters published, and how many of the latter stand for observations.

        What failed is sent again, and only that: an acknowledged record is never sent twice.
        A record the brokers refuse for good (``DeliveryFailure.permanent``) is not retried: an
        observation is replaced by a dead letter (stage size or publish), a dead letter by its
        bare form, which always fits. Other failures (brokers down, timeouts) are retried with
        backoff until ``close`` sets the stop flag; the batch is then ``Abandoned``."""
        todo: list[Observation | DeadLetter] = [*observations, *dead_letters]
        published: list[Observation] = []
        dead: list[DeadLetter] = []
        replaced = 0
        attempt = 0
        timeout = max(30.0, self.kafka.delivery_timeout_ms / 1000 + 5)
        while todo:
            outgoing = [self._outgoing(x) for x in todo]
            try:
                outcomes = self._producer.deliver(outgoing, timeout=timeout, stop=self._stop, grace_s=self.stop_grace_s)
            except DeliveryError as exc:  # the flush itself failed: nothing of it is known acknowledged
                outcomes = [DeliveryFailure(o.topic, None, str(exc)[:200]) for o in outgoing]
            again: list[Observation | DeadLetter] = []
            failures: list[DeliveryFailure] = []
            for item, failure in zip(todo, outcomes):
                if failure is None:
                    if isinstance(item, DeadLetter):
                        dead.append(item)
                    else:
                        published.append(item)
                elif failure.permanent and not (isinstance(item, DeadLetter) and item.bare):
                    replaced += isinstance(item, Observation)
                    again.append(self._undeliverable(item, failure))  # sent at once: no backoff
                else:
                    # A bare dead letter holds nothing of the record: what refuses it is not the record.
                    again.append(item)
                    failures.append(failure)
            todo = again
            if not failures:
                continue
            if self._stop.is_set():
                raise Abandoned(f"{len(failures)} record(s) not acknowledged at shutdown")
            attempt += 1
            log.error("%d of %d record(s) of a batch not acknowledged (attempt %d: %s); sending those again",
                      len(failures), len(todo), attempt, _errors(failures))
            if self._producer.fatal_error is not None:
                self._renew_producer()
            if self._stop.wait(min(30.0, self.retry_pause_s * attempt)):
                raise Abandoned(f"{len(failures)} record(s) not acknowledged at shutdown")
        return published, dead, replaced

    def _outgoing(self, item: Observation | DeadLetter) -> Outgoing:
        if isinstance(item, DeadLetter):
            return Outgoing(self.topics.deadletter, item.record_key(), item.to_bytes(), item.record_timestamp_ms,
                            item.record_headers())
        return Outgoing(self.topics.observations, item.key, item.value, item.timestamp_ms, item.headers)

    def _undeliverable(self, item: Observation | DeadLetter, failure: DeliveryFailure) -> DeadLetter:
        """What to publish instead of a record the brokers refuse for good."""
        if isinstance(item, DeadLetter):
            return item.as_bare(f"this dead letter could not be published whole ({failure.error}): "
                                "the original, its headers and the issues are left out")
        if failure.code in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE):
            stage, issue = "size", Issue("(root)", "the observation is too large to publish")
            reason = (f"the observation of this event takes {len(item.value)} bytes as JSON-LD, more than a record of "
                      f"{self.topics.observations} can hold ({failure.error}): shorten the event (free text, "
                      "extension fields); pixels travel by claim check")
        elif failure.code == KafkaError.INVALID_TIMESTAMP:
            stage, issue = "publish", Issue("occurred_at", "not a time a Kafka record can carry")
            reason = (f"occurred_at {item.occurred_at.isoformat()} cannot be the timestamp of the observation's record "
                      f"({failure.error}): a Kafka timestamp counts milliseconds after 1970-01-01 and the topic may "
                      "bound how far it lies from now")
        else:
            stage, issue = "publish", Issue("(root)", "refused by the brokers")
            reason = f"the brokers refuse the observation of this event for good ({failure.error})"
        src = item.source
        return DeadLetter(
            stage=stage, reason=reason, topic=src.topic, partition=src.partition, offset=src.offset, key=src.key,
            original=src.value, issues=(issue,), timestamp_ms=src.timestamp_ms, headers=dict(src.headers),
            event_id=item.event_id, kind=item.kind,
        )

    def _renew_producer(self) -> None:
        # A fatal error (the idempotent session broken) ends a producer: nothing it sends goes out.
        log.error("the producer failed fatally (%s): starting a new one", self._producer.fatal_error)
        try:
            self._producer.close(1.0)
        except DeliveryError:
            pass
        self._producer = EventProducer(self.kafka)

    def query_json(self, sparql: str) -> dict[str, Any]:
        """Answer over the store once the batches handled so far are in it: a query sees
        every observation published before it."""
        with self._lock:
            self._store_writer.hurry()
            concurrent.futures.wait([future for future, _ in self._unstored])
            return self.store.query_json(sparql)

    def stop(self) -> None:
        """Give up publishing: the batch in progress ends (``Abandoned``) once what is in flight
        had ``stop_grace_s`` more; so does every later ``handle``. ``close`` then closes."""
        self._stop.set()

    def close(self, timeout: float = 10.0) -> None:
        """Stop within ``timeout`` seconds: a batch still publishing is given up (it stays
        uncommitted and is read again after the restart), the batches published are stored
        while the time lasts, then the producer and the store are closed."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self._stop.set()
        if not self._lock.acquire(timeout=left()):
            log.error("a batch was still being normalized at shutdown: left uncommitted")
            return
        try:
            self._store_writer.hurry()
            while self._unstored:
                try:
                    self._unstored[0][0].result(timeout=left())
                except concurrent.futures.TimeoutError:
                    log.error("%d event(s) not stored at shutdown: their batches stay uncommitted", self._unstored_events)
                    break
                except Exception as exc:  # noqa: BLE001  (shutting down: the batch is read again after a restart)
                    log.error("storing the last batches failed at shutdown: %s", failure_trace(exc))
                    break
                self._wait_oldest()
            if self._store_writer.close(max(0.1, left())):
                self.store.flush()
            else:
                log.error("the RDF store was still loading at shutdown: not flushed")
            try:
                # What is still in flight belongs to a batch given up: not worth the whole wait.
                self._producer.close(max(0.1, min(left(), self.stop_grace_s)))
            except DeliveryError as exc:
                log.error("records not delivered at shutdown: %s", exc)
        finally:
            self._lock.release()


@dataclass
class _StoreJob:
    graphs: list[tuple[str, str]]
    on_durable: Callable[[], None] | None
    done: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


_HURRY = object()  # ends the current wait for more batches


class StoreWriter:
    """One thread that stores batches in the order given, several at a time.

    Having taken a batch, it waits up to ``within_s`` for more until it holds ``min_events``,
    then stores them in one call (up to ``max_events``). Oxigraph's bulk loads are much cheaper
    per event in big runs: each one leaves files that RocksDB must merge with what it already
    holds, so 5000 events at a time cost ~140 us/event against ~220 in runs of 500 (40k events,
    compaction included, measured). Publishing does not wait for this; only the commit of the
    batches' offsets (``on_durable``) and queries do, and ``hurry`` cuts the wait short.
    """

    def __init__(
        self,
        store: Callable[[list[tuple[str, str]]], None],
        *,
        min_events: int = 1,
        within_s: float = 0.0,
        max_events: int = 10_000,
    ) -> None:
        self._store = store
        self.min_events = min_events
        self.within_s = within_s
        self.max_events = max(max_events, min_events)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="rdf-store", daemon=True)
        self._thread.start()

    def submit(self, graphs: list[tuple[str, str]], on_durable: Callable[[], None] | None) -> concurrent.futures.Future[None]:
        job = _StoreJob(graphs, on_durable)
        self._queue.put(job)
        return job.done

    def hurry(self) -> None:
        """Store what is waiting now instead of waiting for more."""
        self._queue.put(_HURRY)

    def close(self, timeout: float | None = None) -> bool:
        """Stop after what was submitted; False if that is still being stored after ``timeout``."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _take(self) -> tuple[list[_StoreJob], bool]:
        """(jobs to store together, whether to stop after them)."""
        jobs: list[_StoreJob] = []
        events = 0
        deadline = None
        while events < self.max_events:
            if not jobs:
                job = self._queue.get()
            else:
                try:
                    if events >= self.min_events:
                        job = self._queue.get_nowait()  # whatever queued up meanwhile, not more
                    else:
                        assert deadline is not None
                        job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if job is None:
                return jobs, True
            if job is _HURRY:
                if jobs:
                    break
                continue
            jobs.append(job)
            events += len(job.graphs)
            if deadline is None:
                deadline = time.monotonic() + self.within_s
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._take()
            if not jobs:
                continue
            try:
                self._store([g for job in jobs for g in job.graphs])
            except BaseException as exc:  # noqa: BLE001  (handed to the batches' futures: handle re-raises)
                for job in jobs:
                    job.done.set_exception(exc)
                continue
            for job in jobs:
                if job.on_durable is not None:
                    try:
                        job.on_durable()
                    except Exception as exc:  # noqa: BLE001  (the batch is stored; it is read again if not acked)
                        log.error("reporting a stored batch failed: %s", failure_trace(exc))
                job.done.set_result(None)


def _errors(failures: Sequence[DeliveryFailure]) -> str:
    """The errors of failed records, counted (for logs: no keys, no values)."""
    counts = collections.Counter(f.error for f in failures)
    return "; ".join(f"{n} x {error[:200]}" for error, n in counts.most_common(5))


def _ack_later(loop: asyncio.AbstractEventLoop, events: Sequence[Any]) -> None:
    """Ack faust events from the store-writer thread (on the event loop's own thread)."""

    def ack() -> None:
        for event in events:
            event.ack()

    try:
        loop.call_soon_threadsafe(ack)
    except RuntimeError:  # the loop is closed: not committed, read again and deduplicated
        log.info("event loop closed before %d event(s) were acknowledged", len(events))


def source_record(message: Any) -> SourceRecord:
    """A faust (aiokafka) message as a SourceRecord."""
    raw_headers = message.headers or []
    items: Iterable[tuple[Any, Any]] = raw_headers.items() if isinstance(raw_headers, Mapping) else raw_headers
    headers = {str(k): (v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v)) for k, v in items}
    key = message.key
    return SourceRecord(
        topic=message.topic,
        partition=int(message.partition),
        offset=int(message.offset),
        key=key.decode("utf-8", "replace") if isinstance(key, (bytes, bytearray)) else key,
        value=bytes(message.value) if message.value is not None else None,
        headers=headers,
        timestamp_ms=int(round(message.timestamp * 1000)) if message.timestamp else None,
    )


def record_to_source(record: Record) -> SourceRecord:
    return SourceRecord(record.topic, record.partition, record.offset, record.key, record.value, record.headers, record.timestamp_ms)


def create_app(
    kafka: KafkaSettings,
    settings: NormalizerSettings,
    agent_settings: AgentSettings,
    *,
    app_id: str | None = None,
    make_normalizer: Callable[[NormalizerSettings, Topics], Normalizer] = Normalizer,
    make_store: Callable[[Path], RdfStore] = RdfStore,
) -> Any:
    """The faust app with the normalizer agent (and the SPARQL page when a web port is set).

    ``make_normalizer`` and ``make_store`` build its two parts (bench.stream swaps either for
    one that costs nothing, to measure what the rest of the worker allows)."""
    import faust  # noqa: PLC0415  (faust is needed only where the agent runs)

    from stream.faust_fetch import set_faust_fetch_wait  # noqa: PLC0415

    set_faust_fetch_wait(kafka.fetch_wait_max_ms)
    topics = Topics.from_settings(kafka)
    agent_settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id or f"{kafka.consumer_group}-normalizer",
        **kafka.faust_config(),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        autodiscover=False,
        datadir=str(agent_settings.data_dir / "faust"),
        web_enabled=agent_settings.web_port > 0,
        web_port=agent_settings.web_port or 6066,
        web_bind=agent_settings.web_host,
        web_host=agent_settings.web_host,
        topic_partitions=kafka.topic_partitions,
        topic_replication_factor=kafka.topic_replication,
        producer_acks=-1,
        broker_commit_interval=1.0,
    )
    channel = app.topic(*topics.events(), key_serializer="raw", value_serializer="raw")
    holder: dict[str, Any] = {}
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="normalizer")
    app.normalizer_state = holder  # type: ignore[attr-defined]

    def service() -> NormalizerService:
        if "service" not in holder:
            holder["service"] = NormalizerService(
                kafka,
                make_normalizer(settings, topics),
                make_store(agent_settings.store_path),
                store_events=agent_settings.store_events,
                store_within_s=agent_settings.store_within_s,
            )
        return holder["service"]  # type: ignore[no-any-return]

    @app.agent(channel, name="normalize", concurrency=1)
    async def normalize(stream: Any) -> Any:
        loop = asyncio.get_running_loop()
        svc = await loop.run_in_executor(executor, service)
        # Everything built so far (faust, the clients, the shapes, the term table) lives as
        # long as the worker: frozen out of the cyclic collector, and with fewer young
        # collections, a batch's short-lived graphs cost ~15 % less (bench.stream).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        async for events in stream.take_events(agent_settings.batch_size, within=agent_settings.batch_within_s):
            records = [source_record(event.message) for event in events]
            # One more reference per message: take_events' own ack after this body then does
            # not make the offsets committable; the store writer's on_durable does.
            for event in events:
                event.message.incref()
            try:
                await loop.run_in_executor(executor, svc.handle, records, functools.partial(_ack_later, loop, events))
            except Abandoned:
                # Closing: the batch is not acknowledged, so it is read again after the restart.
                log.warning("closing: a batch of %d record(s) left uncommitted", len(records))
                return
            if len(events) < agent_settings.batch_size:
                # The input is idle (a backlog fills every batch): store now rather than wait
                # for a bigger load, so that offsets are committed and queries are fresh.
                svc.store_now()

    @app.page("/sparql")
    async def sparql(web: Any, request: Any) -> Any:
        query = request.query.get("query")
        if query is None and request.method == "POST":
            if request.content_type == "application/sparql-query":
                query = await request.text()
            else:
                form = await request.post()
                query = form.get("query")
        if not query:
            return web.json({"error": "pass a SPARQL query as ?query=..."}, status=400)
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(executor, service().query_json, str(query))
        except Exception as exc:  # noqa: BLE001  (a bad query answers 400, it does not stop the worker)
            return web.json({"error": str(exc)[:500]}, status=400)
        return web.json(result)

    @app.page("/normalizer/stats")
    async def stats(web: Any, request: Any) -> Any:
        svc = holder.get("service")
        counters = svc.counters if svc is not None else Counters()
        return web.json({**counters.__dict__, "store_quads": len(svc.store) if svc is not None else 0})

    @app.on_before_shutdown.connect
    def _close(app: Any = None, **kwargs: Any) -> None:
        svc = holder.get("service")
        if svc is not None:
            svc.close()

    return app


def run(
    kafka: KafkaSettings | None = None,
    settings: NormalizerSettings | None = None,
    agent_settings: AgentSettings | None = None,
    *,
    loglevel: str = "info",
    **parts: Any,
) -> int:
    """Run the normalizer worker until SIGINT/SIGTERM (faust handles both: the current batch
    finishes, offsets are committed, the group is left). ``parts`` go to ``create_app``."""
    import faust  # noqa: PLC0415

    from stream.broker import ensure_broker  # noqa: PLC0415

    kafka = kafka or KafkaSettings.from_env()
    settings = settings or NormalizerSettings.from_env()
    agent_settings = agent_settings or AgentSettings.from_env()
    kafka, broker = ensure_broker(kafka)
    try:
        ensure_topics(kafka, Topics.from_settings(kafka))
        app = create_app(kafka, settings, agent_settings, **parts)

        class Worker(faust.Worker):  # type: ignore[misc]
            # faust stops its consumer (which waits for the agent's batch) before the app's
            # on_before_shutdown: publishing must hear of the signal at once.
            def _on_sigterm(self) -> None:
                _begin_shutdown(app)
                super()._on_sigterm()

            def _on_sigint(self) -> None:
                _begin_shutdown(app)
                super()._on_sigint()

        worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0
    finally:
        if broker is not None:
            broker.stop()


def _begin_shutdown(app: Any) -> None:
    """Stop publishing now, and end the process ``SHUTDOWN_S`` from now if it is still running
    then: what was not committed is read again after the restart, as after a crash (the RDF
    store and the offsets are made for that)."""
    state = app.normalizer_state
    if state.get("service") is not None:
        state["service"].stop()
    if "deadline" not in state:
        # Started here, not by stream.shutdown.on_signal_delivery: faust's asyncio loop owns
        # the signals and the wakeup fd.
        state["deadline"] = start_deadline("normalizer")


def main() -> int:  # pragma: no cover - entry point
    level = os.environ.get("ONCOTWIN_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(loglevel=level.lower())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
