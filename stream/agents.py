"""The normalizer as a faust-streaming app: one agent over the four event topics.

    python -m stream.agents            # or `oncotwin normalize`

The agent reads micro-batches (``stream.take_events(n, within=...)``) of raw records from
``oncotwin.events.{imaging,lab,ctdna,treatment}.v1`` and hands each batch to a worker thread
that runs ``stream.normalizer`` and then, in this order:

1. publishes each observation (JSON-LD, key = patient pseudonym, headers, timestamp = event
   time) to ``oncotwin.observations.v1`` and each dead letter to ``oncotwin.deadletter.v1``,
   and waits until the brokers acknowledged every record (retrying, never dropping);
2. adds the observations' graphs to the RDF store and marks them stored (the durable seen-set
   that makes duplicates produce one observation);
3. acknowledges the batch's events to faust once the graphs are stored: offsets are committed
   only for records whose outcome is durable. Storing runs in a thread of its own while the
   next batch is normalized. A crash between 1 and 2 republishes the batch's observations after
   the restart (at-least-once); consumers deduplicate on the event id.

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

from stream.consumer import Record
from stream.deadletter import DeadLetter
from stream.normalizer import BatchResult, Normalizer, NormalizerSettings, SourceRecord
from stream.producer import DeliveryError, EventProducer
from stream.rdfstore import RdfStore
from stream.settings import KafkaSettings
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
    records: int = 0
    observations: int = 0
    dead_letters: int = 0
    duplicates: int = 0
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


class NormalizerService:
    """The Kafka- and store-facing side of the normalizer, independent of faust.

    ``handle`` normalizes and publishes a batch in the caller's thread and hands the graphs to
    a store-writer thread (Oxigraph loads without the GIL), so that storing batch k overlaps
    normalizing batch k+1. A batch is durable once its graphs are stored and marked;
    ``on_durable`` tells the caller when, and only then may its offsets be committed. The store
    writer gathers ``store_events`` events (waiting at most ``store_within_s``) per load; at
    most ``max_unstored`` events wait for the store. Events published but not yet marked count
    as seen, so a duplicate in the next batch is still caught.
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
    ) -> None:
        self.kafka = kafka
        self.topics = normalizer.topics
        self.normalizer = normalizer
        self.store = store
        self.counters = Counters()
        self.retry_pause_s = retry_pause_s
        self.max_unstored = max(1, max_unstored, store_events)
        self._producer = EventProducer(kafka)
        self._lock = threading.Lock()
        self._store_writer = StoreWriter(self._store, min_events=store_events, within_s=store_within_s)
        # (future, events) of the batches handed to the store writer and not yet stored
        self._unstored: collections.deque[tuple[concurrent.futures.Future[None], int]] = collections.deque()
        self._unstored_events = 0
        self._unmarked: set[str] = set()
        self._unmarked_lock = threading.Lock()

    def handle(self, records: Sequence[SourceRecord], on_durable: Callable[[], None] | None = None) -> BatchResult:
        """Normalize, publish (until acknowledged), then store in the background. Runs in one
        worker thread; raises if storing an earlier batch failed (that batch never becomes
        durable, so it is read again after a restart)."""
        with self._lock:
            self._check_store()
            result = self.normalizer.process(records, seen=self._seen)
            self._publish(result.observations, result.dead_letters)
            graphs = [(o.event_id, o.ntriples) for o in result.observations]
            with self._unmarked_lock:
                self._unmarked.update(eid for eid, _ in graphs)
            while self._unstored and self._unstored_events + len(graphs) > self.max_unstored:
                self._store_writer.hurry()
                self._wait_oldest()
            self._unstored.append((self._store_writer.submit(graphs, on_durable), len(graphs)))
            self._unstored_events += len(graphs)
            self.counters.add(result, len(records))
            for dead in result.dead_letters:
                log.warning(
                    "dead letter %s[%d]@%d stage=%s: %s",
                    dead.topic, dead.partition, dead.offset, dead.stage, dead.reason[:300],
                )
            if result.duplicates:
                log.info("skipped %d duplicate event(s) already published", len(result.duplicates))
            return result

    def _seen(self, event_id: str) -> bool:
        with self._unmarked_lock:
            if event_id in self._unmarked:
                return True
        return self.store.contains_event(event_id)

    def _store(self, graphs: list[tuple[str, str]]) -> None:
        # Marked only after the batches were published (handle publishes first): a crash
        # before the marks republishes them rather than losing them.
        self.store.mark(self.store.write(graphs))
        with self._unmarked_lock:
            self._unmarked.difference_update(eid for eid, _ in graphs)
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

    def _publish(self, observations: Sequence[Any], dead_letters: Sequence[DeadLetter]) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                for o in observations:
                    self._producer.send(self.topics.observations, o.key, o.value, timestamp_ms=o.timestamp_ms, headers=o.headers)
                for d in dead_letters:
                    ts = d.timestamp_ms if d.timestamp_ms and d.timestamp_ms > 0 else None
                    self._producer.send(self.topics.deadletter, d.key, d.to_bytes(), timestamp_ms=ts, headers=d.record_headers())
                self._producer.flush(max(30.0, self.kafka.delivery_timeout_ms / 1000 + 5))
                return
            except DeliveryError as exc:
                # Not acknowledged: the batch is sent again (consumers deduplicate on event id);
                # its offsets are not committed until it went through.
                log.error("publishing a batch failed (attempt %d), retrying: %s", attempt, exc)
                time.sleep(min(30.0, self.retry_pause_s * attempt))

    def query_json(self, sparql: str) -> dict[str, Any]:
        """Answer over the store once the batches handled so far are in it: a query sees
        every observation published before it."""
        with self._lock:
            self._store_writer.hurry()
            concurrent.futures.wait([future for future, _ in self._unstored])
            return self.store.query_json(sparql)

    def close(self) -> None:
        try:
            self.drain()
        except Exception:  # noqa: BLE001  (shutting down: the batch is read again after a restart)
            log.exception("storing the last batches failed at shutdown")
        with self._lock:
            try:
                self._producer.close(10)
            except DeliveryError as exc:
                log.error("records not delivered at shutdown: %s", exc)
            self._store_writer.close()
            self.store.flush()


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

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

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
                    except Exception:  # noqa: BLE001  (the batch is stored; it is read again if not acked)
                        log.exception("reporting a stored batch failed")
                job.done.set_result(None)


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
            await loop.run_in_executor(executor, svc.handle, records, functools.partial(_ack_later, loop, events))
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
        worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0
    finally:
        if broker is not None:
            broker.stop()


def main() -> int:  # pragma: no cover - entry point
    level = os.environ.get("ONCOTWIN_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(loglevel=level.lower())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
