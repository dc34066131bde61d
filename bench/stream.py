"""Streaming benchmark: records per second through Kafka, stage by stage.

    python -m bench.stream [--records 20000] [--size 1024] [--partitions 6] [--events 10000] [--bounds]

Uses KAFKA_BOOTSTRAP_SERVERS when set, else the embedded tansu broker. Prints a table, then
as its last line one JSON object ({"bench": "stream", "raw_produce_per_s": ..., ...}).

Besides rates, the faust stages report the CPU time per event of the worker process (all its
threads) and of the embedded broker over the same interval (``*_cpu_us_per_event``, Linux): on a
machine whose cores are all busy, rates follow CPU per event, and unlike rates it does not move
when something else runs beside the bench.

``--bounds`` runs the normalizer twice more, each time with one of its two costly parts taken
away: without the RDF store (``normalizer_without_store``), and with every event's outcome
computed before the worker reads anything (``normalizer_precomputed``: parsing, contract, RDF,
SHACL and serialization cost a dictionary lookup). What each variant reaches is the most the
rest of the worker allows, a ceiling no faster code for the missing part can pass.

Stages run in order on a shared ``BenchContext`` and each returns a ``StageResult``; a new
stage (faust pass-through, normalizer, end-to-end latency p50/p99) is one more function
appended to ``STAGES`` that reads the topics the earlier stages filled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream import BatchConsumer, EventProducer, KafkaSettings, Topics, ensure_broker, ensure_topics, record_headers

T0_MS = 1_735_689_600_000  # 2025-01-01T00:00Z: event times of the synthetic records


@dataclass
class BenchContext:
    settings: KafkaSettings
    topics: Topics
    records: int
    record_bytes: int
    patients: int
    broker: str
    # Figures a stage wants in the JSON line besides its rate (e.g. group_join_s).
    extra: dict[str, Any] = field(default_factory=dict)
    events: int = 10_000  # clinical events for the faust / normalizer stages
    # State shared by later stages (worker processes, the bench cohort) and what stops them.
    state: dict[str, Any] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)


@dataclass(frozen=True)
class StageResult:
    name: str
    records: int
    seconds: float
    payload_bytes: int

    @property
    def per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mb_per_s(self) -> float:
        return self.payload_bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


Stage = Callable[[BenchContext], StageResult]


def synthetic_value(i: int, size: int) -> bytes:
    """A ``size``-byte JSON-ish record (content does not matter: no compression is set)."""
    head = f'{{"seq": {i}, "pad": "'.encode()
    tail = b'"}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


def raw_produce(ctx: BenchContext) -> StageResult:
    """EventProducer (idempotent, acks=all) into the lab topic, timed to the last ack."""
    topic = ctx.topics.lab
    values = [synthetic_value(i, ctx.record_bytes) for i in range(ctx.records)]
    headers = record_headers(schema_version=1)
    with EventProducer(ctx.settings) as producer:
        # The first delivery of a fresh idempotent producer waits for its producer id
        # (librdkafka retries every 500 ms): a one-off cost, reported apart.
        start = time.perf_counter()
        producer.send(ctx.topics.deadletter, "warmup", b"{}")
        producer.flush(30)
        ctx.extra["producer_warmup_s"] = round(time.perf_counter() - start, 3)

        start = time.perf_counter()
        for i, value in enumerate(values):
            producer.send(
                topic, f"PSN-{i % ctx.patients:05d}", value, timestamp_ms=T0_MS + i * 1000, headers=headers
            )
        producer.flush(120)
        seconds = time.perf_counter() - start
    return StageResult("raw_produce", ctx.records, seconds, sum(map(len, values)))


def raw_consume(ctx: BenchContext) -> StageResult:
    """BatchConsumer in a fresh group reading the lab topic, timed from the first record.

    Group formation is excluded from the rate (tansu waits ~session.timeout/2) and reported
    as group_join_s.
    """
    group = f"bench-{uuid.uuid4().hex[:8]}"
    received = payload = 0
    with BatchConsumer(ctx.settings, [ctx.topics.lab], group_id=group) as consumer:
        subscribed = time.perf_counter()
        first_at: float | None = None
        deadline = subscribed + 120
        while received < ctx.records and time.perf_counter() < deadline:
            batch = consumer.poll_batch(max_records=5_000, timeout=0.5)
            if batch and first_at is None:
                first_at = time.perf_counter()
            received += len(batch)
            payload += sum(len(r.value or b"") for r in batch)
        end = time.perf_counter()
    if received < ctx.records:
        raise RuntimeError(f"raw_consume: {received} of {ctx.records} records came back")
    assert first_at is not None
    ctx.extra["group_join_s"] = round(first_at - subscribed, 3)
    return StageResult("raw_consume", received, end - first_at, payload)


# -- faust and the normalizer ----------------------------------------------------------------
#
# Both workers run in their own process (as in production) on the same backlog of clinical
# events: a virtual cohort's events (mostly treatments, some labs, ctDNA and MRI scans whose
# claim checks resolve under the cohort folder), cycled with fresh event ids and pseudonyms.
# Rates are timed from the first output record to the last one, as seen by polling the output
# topic's end offsets, so worker start-up and group joining are excluded (reported apart).


def _bench_events(ctx: BenchContext) -> list[tuple[str, str, bytes, int]]:
    """(topic, key, value, timestamp ms) of ``ctx.events`` valid clinical events."""
    if "events" in ctx.state:
        return ctx.state["events"]  # type: ignore[no-any-return]
    import tempfile  # noqa: PLC0415

    from models import Grid  # noqa: PLC0415
    from models.virtual_patient import CohortConfig, generate_cohort  # noqa: PLC0415
    from schemas import parse_time  # noqa: PLC0415
    from stream.eventlog import read_events  # noqa: PLC0415
    from stream.producer import timestamp_ms  # noqa: PLC0415
    from stream.virtual_feed import write_cohort  # noqa: PLC0415

    root = Path(tempfile.mkdtemp(prefix="oncotwin-bench-"))
    config = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=120, truth_margin_days=10)
    write_cohort(generate_cohort(2, seed=7, config=config), root)
    template = read_events(root / "events.jsonl")
    out = []
    for i in range(ctx.events):
        event = dict(template[i % len(template)])
        event["event_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench:{i}"))
        event["patient_id"] = f"PSN-{i % ctx.patients:05d}"
        value = json.dumps(event).encode()
        out.append((ctx.topics.event_topic(event["kind"]), event["patient_id"], value, timestamp_ms(parse_time(event["occurred_at"]))))
    ctx.state["events"] = out
    ctx.state["cohort_root"] = root
    kinds: dict[str, int] = {}
    for topic, *_ in out:
        kinds[topic.split(".")[-2]] = kinds.get(topic.split(".")[-2], 0) + 1
    ctx.extra["event_mix"] = kinds
    return out


def _cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system, all threads) a process has used so far; None off Linux."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _CpuMeter:
    """CPU microseconds per event of the worker and of the embedded broker between two marks:
    a figure that, unlike a rate, does not depend on what else runs on the machine."""

    def __init__(self, ctx: BenchContext, process: Any) -> None:
        self.pids = {"worker": process.pid, "broker": ctx.state.get("broker_pid")}
        self.start: dict[str, float | None] = {}

    def mark(self) -> None:
        self.start = {k: _cpu_s(pid) for k, pid in self.pids.items()}

    def per_event_us(self, events: int) -> dict[str, float]:
        out = {}
        for k, pid in self.pids.items():
            end, start = _cpu_s(pid), self.start.get(k)
            if end is not None and start is not None and events > 0:
                out[k] = round((end - start) / events * 1e6, 1)
        return out


def _watch(
    ctx: BenchContext,
    topic: str,
    expected: int,
    process: Any,
    timeout: float = 300,
    settled: Callable[[], bool] | None = None,
) -> tuple[float, float, float]:
    """(seconds to the first output record, seconds from first to last, start), reading the
    output topic from its beginning. (Counting by end offsets would be cheaper, but tansu's
    high watermarks lag behind what is readable.) With ``settled``, the last moment is when it
    first returns True after every record came (the work a worker does after publishing, such
    as storing, counts). Leaves the CPU the worker and the broker used per event over the same
    interval in ``ctx.state["cpu_us"]``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition  # noqa: PLC0415

    consumer = Consumer(ctx.settings.consumer_config(f"bench-watch-{uuid.uuid4().hex[:6]}"))
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions])
        start = time.perf_counter()
        first = None
        done = at_first = 0
        meter = _CpuMeter(ctx, process)
        deadline = start + timeout
        last_progress, longest_pause = start, 0.0
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with status {process.returncode}")
            messages = consumer.consume(num_messages=10_000, timeout=0.05)
            arrived = sum(1 for m in messages if m.error() is None)
            done += arrived
            now = time.perf_counter()
            if arrived:
                if first is not None:
                    longest_pause = max(longest_pause, now - last_progress)
                last_progress = now
            if done > 0 and first is None:
                first, at_first = now, done
                meter.mark()
            if done >= expected:
                assert first is not None
                while settled is not None and not settled() and time.perf_counter() < deadline:
                    time.sleep(0.005)
                now = time.perf_counter()
                ctx.state["cpu_us"] = meter.per_event_us(done - at_first)
                # The longest wait between two arrivals: tansu pauses for 0.2-0.9 s now and then
                # (every client and the broker idle), which a short stage feels most.
                ctx.state["longest_pause_s"] = round(longest_pause, 2)
                return first - start, now - first, start
        raise RuntimeError(f"{topic}: only {done} of {expected} records within {timeout:.0f}s")
    finally:
        consumer.close()


def _count(ctx: BenchContext, topic: str) -> int:
    from stream import read_all  # noqa: PLC0415

    return len(read_all(ctx.settings, topic, timeout=20, idle_timeout=1.0))


def _worker(ctx: BenchContext, args: list[str], env: dict[str, str], log_name: str) -> Any:
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    log_path = Path(tempfile.gettempdir()) / f"{ctx.settings.topic_prefix}-{log_name}.log"
    process = subprocess.Popen(
        [sys.executable, *args],
        env={**os.environ, **env},
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
    )

    ctx.cleanups.append(lambda: _terminate(process))
    return process


def _terminate(process: Any) -> None:
    import subprocess  # noqa: PLC0415

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def _produce_events(ctx: BenchContext, topic_of: Any = None) -> None:
    with EventProducer(ctx.settings) as producer:
        for topic, key, value, ts in _bench_events(ctx):
            producer.send(topic_of(topic) if topic_of else topic, key, value, timestamp_ms=ts, headers=record_headers())
        producer.flush(120)


def _kafka_env(ctx: BenchContext, group: str) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": ctx.settings.bootstrap_servers,
        "ONCOTWIN_CONSUMER_GROUP": group,
        "ONCOTWIN_LOG_LEVEL": "WARNING",
    }


def faust_passthrough(ctx: BenchContext) -> StageResult:
    """A faust agent copying the event topics to one topic, with the normalizer's plumbing
    (take_events micro-batches in, librdkafka out, flush per batch): the ceiling the
    normalizer is compared with."""
    prefix = f"{ctx.settings.topic_prefix}-pt"
    topics = Topics(prefix)
    ensure_topics(ctx.settings, topics, partitions=ctx.settings.topic_partitions)
    _produce_events(ctx, lambda topic: topic.replace(ctx.settings.topic_prefix, prefix, 1))
    env = {**_kafka_env(ctx, f"{prefix}-group"), "ONCOTWIN_TOPIC_PREFIX": prefix}
    process = _worker(ctx, ["-m", "bench.stream", "--worker", "passthrough"], env, "passthrough")
    ctx.state["passthrough"] = process
    join, seconds, _ = _watch(ctx, topics.observations, ctx.events, process)
    ctx.extra["passthrough_start_s"] = round(join, 2)
    ctx.extra["passthrough_longest_pause_s"] = ctx.state["longest_pause_s"]
    for who, us in ctx.state.get("cpu_us", {}).items():
        ctx.extra[f"passthrough_{who}_cpu_us_per_event"] = us
    return StageResult("faust_passthrough", ctx.events, seconds, sum(len(v) for _, _, v, _ in _bench_events(ctx)))


def normalizer(ctx: BenchContext) -> StageResult:
    """The normalizer worker (python -m stream.agents): parse, contract, terms, claim checks,
    RDF, SHACL, JSON-LD published, graphs stored in Oxigraph."""
    _stop(ctx, "passthrough")  # an idle faust worker still polls: not beside the one timed
    return _normalizer_stage(ctx, "normalizer", "nz", ["-m", "stream.agents"])


def normalizer_without_store(ctx: BenchContext) -> StageResult:
    """The normalizer with an RDF store that keeps nothing (a bound: see ``--bounds``)."""
    _stop(ctx, "normalizer")
    return _normalizer_stage(ctx, "normalizer_without_store", "nzs", ["-m", "bench.stream", "--worker", "normalizer", "--without", "store"])


def normalizer_precomputed(ctx: BenchContext) -> StageResult:
    """The normalizer looking each event's outcome up (a bound: see ``--bounds``)."""
    _stop(ctx, "normalizer_without_store")
    events_file = Path(ctx.state["cohort_root"]) / "bench-events.jsonl"
    write_events_file(events_file, [(topic.split(".")[-2], key, value) for topic, key, value, _ in _bench_events(ctx)])
    return _normalizer_stage(
        ctx, "normalizer_precomputed", "nzp",
        ["-m", "bench.stream", "--worker", "normalizer", "--without", "normalization"],
        {"ONCOTWIN_BENCH_EVENTS": str(events_file)},
    )


def _normalizer_stage(ctx: BenchContext, name: str, suffix: str, args: list[str], env: dict[str, str] | None = None) -> StageResult:
    import tempfile  # noqa: PLC0415

    from stream.broker import free_port  # noqa: PLC0415

    # Topics of its own: the raw stages left synthetic (non-event) records in the main ones.
    prefix = f"{ctx.settings.topic_prefix}-{suffix}"
    topics = Topics(prefix)
    ensure_topics(ctx.settings, topics, partitions=ctx.settings.topic_partitions)
    _produce_events(ctx, lambda topic: topic.replace(ctx.settings.topic_prefix, prefix, 1))
    data_dir = Path(tempfile.mkdtemp(prefix="oncotwin-bench-data-"))
    port = free_port()
    env = {
        **_kafka_env(ctx, f"{prefix}-group"),
        "ONCOTWIN_TOPIC_PREFIX": prefix,
        "ONCOTWIN_IMAGING_ROOT": str(ctx.state["cohort_root"]),
        "ONCOTWIN_DATA_DIR": str(data_dir),
        "ONCOTWIN_NORMALIZER_WEB_PORT": str(port),
        **(env or {}),
    }
    process = _worker(ctx, args, env, name)
    ctx.state[name] = process
    ctx.state[f"{name}_topics"] = topics

    def stored() -> bool:
        # Timed until the graphs are in the RDF store, not only published.
        import urllib.request  # noqa: PLC0415

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/normalizer/stats", timeout=5) as response:
            return int(json.loads(response.read())["stored"]) >= ctx.events

    join, seconds, _ = _watch(ctx, topics.observations, ctx.events, process, settled=stored)
    ctx.extra[f"{name}_start_s"] = round(join, 2)
    ctx.extra[f"{name}_longest_pause_s"] = ctx.state["longest_pause_s"]
    for who, us in ctx.state.get("cpu_us", {}).items():
        ctx.extra[f"{name}_{who}_cpu_us_per_event"] = us
    ctx.extra[f"{name}_dead_letters"] = _count(ctx, topics.deadletter)
    return StageResult(name, ctx.events, seconds, sum(len(v) for _, _, v, _ in _bench_events(ctx)))


def _stop(ctx: BenchContext, name: str) -> None:
    """Stop a stage's worker once no later stage needs it."""
    if name in ctx.state:
        _terminate(ctx.state[name])


def latency(ctx: BenchContext, rate: float = 400.0, seconds: float = 5.0) -> StageResult:
    """Produce->normalized latency at a steady ``rate`` of events per second (below capacity):
    from the send of an event to the arrival of its observation at a consumer."""
    import threading  # noqa: PLC0415

    process = ctx.state["normalizer"]
    topics: Topics = ctx.state["normalizer_topics"]
    count = int(rate * seconds)
    events = _bench_events(ctx)
    sent_at: dict[str, float] = {}
    received: dict[str, float] = {}
    done = threading.Event()

    def consume() -> None:
        group = f"bench-lat-{uuid.uuid4().hex[:6]}"
        with BatchConsumer(ctx.settings, group_id=group, config_overrides={"auto.offset.reset": "latest"}) as consumer:
            consumer.subscribe([topics.observations])
            ready.set()
            while not done.is_set():
                for record in consumer.poll_batch(max_records=1000, timeout=0.1):
                    event_id = record.headers.get("event-id")
                    if event_id:
                        received.setdefault(event_id, time.perf_counter())

    ready = threading.Event()
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    ready.wait(30)
    time.sleep(ctx.settings.session_timeout_ms / 1000)  # the consumer group forms (tansu)
    with EventProducer(ctx.settings) as producer:
        start = time.perf_counter()
        for i in range(count):
            topic, key, value, ts = events[i % len(events)]
            event = json.loads(value)
            event["event_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-latency:{i}"))
            due = start + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            sent_at[event["event_id"]] = time.perf_counter()
            topic = topic.replace(ctx.settings.topic_prefix, topics.prefix, 1)
            producer.send(topic, key, json.dumps(event).encode(), timestamp_ms=ts, headers=record_headers())
            producer.poll(0)
        producer.flush(60)
    deadline = time.perf_counter() + 60
    while len(received.keys() & sent_at.keys()) < count and time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the normalizer exited during the latency stage")
        time.sleep(0.1)
    done.set()
    thread.join(10)
    latencies = sorted((received[e] - sent_at[e]) * 1000 for e in sent_at if e in received)
    if not latencies:
        raise RuntimeError("latency: no observation came back")
    ctx.extra["latency_events"] = len(latencies)
    ctx.extra["latency_rate_per_s"] = rate
    ctx.extra["latency_p50_ms"] = round(latencies[len(latencies) // 2], 1)
    ctx.extra["latency_p99_ms"] = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1)
    return StageResult("latency", len(latencies), seconds, 0)


STAGES: list[Stage] = [raw_produce, raw_consume, faust_passthrough, normalizer, latency]
BOUNDS: list[Stage] = [normalizer_without_store, normalizer_precomputed]


# -- the pass-through worker (python -m bench.stream --worker passthrough) -------------------


def passthrough_worker() -> int:
    import asyncio  # noqa: PLC0415
    import concurrent.futures  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import faust  # noqa: PLC0415

    from stream.faust_fetch import set_faust_fetch_wait  # noqa: PLC0415

    kafka = KafkaSettings.from_env()
    set_faust_fetch_wait(kafka.fetch_wait_max_ms)  # the normalizer's plumbing
    topics = Topics.from_settings(kafka)
    datadir = tempfile.TemporaryDirectory(prefix="oncotwin-bench-faust-")
    app = faust.App(
        f"{kafka.consumer_group}-passthrough",
        **kafka.faust_config(),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        autodiscover=False,
        web_enabled=False,
        topic_partitions=kafka.topic_partitions,
        datadir=datadir.name,  # not the current directory
    )
    channel = app.topic(*topics.events(), key_serializer="raw", value_serializer="raw")
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    producer: dict[str, EventProducer] = {}

    def forward(messages: list[Any]) -> None:
        out = producer.setdefault("p", EventProducer(kafka))
        for m in messages:
            out.send(topics.observations, m.key.decode() if m.key else None, m.value, timestamp_ms=int(m.timestamp * 1000) or None)
        out.flush(60)

    @app.agent(channel, name="passthrough")
    async def passthrough(stream: Any) -> Any:
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(500, within=0.05):
            await loop.run_in_executor(executor, forward, [e.message for e in events])

    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False)
    with datadir:
        worker.execute_from_commandline()
    return 0


# -- the bound workers (python -m bench.stream --worker normalizer --without PART) -----------


def null_store(path: Path) -> Any:
    """An RDF store that keeps no triples: loads cost nothing; it only remembers which events
    were marked (the normalizer's seen-set)."""
    from stream.rdfstore import RdfStore  # noqa: PLC0415

    class NullStore(RdfStore):
        marked: set[str]

        def _load(self, text: str, format: Any = None) -> None:  # noqa: A002, ARG002
            return None

        def mark(self, event_ids: Any) -> None:
            self.marked.update(event_ids)

        def contains_event(self, event_id: str) -> bool:
            return event_id in self.marked

    store = NullStore(None)
    store.marked = set()
    return store


def write_events_file(path: Path, events: list[tuple[str, str, bytes]]) -> None:
    """(kind, key, value) of events as the JSONL ``precomputed_normalizer`` reads."""
    with path.open("w") as out:
        for kind, key, value in events:
            out.write(json.dumps({"kind": kind, "key": key, "value": value.decode()}) + "\n")


def precomputed_normalizer(settings: Any, topics: Topics, events_file: Path | None = None) -> Any:
    """A Normalizer that normalizes the events of ``events_file`` (JSONL of kind, key, value;
    default $ONCOTWIN_BENCH_EVENTS) once, when built, and then answers each record of a known
    event by a lookup of its event id. Their graphs keep the provenance of that first pass
    (partition 0, offset = line number): a bound, not a normalizer. Records of other events
    are normalized as usual."""
    import dataclasses  # noqa: PLC0415

    import orjson  # noqa: PLC0415

    from stream.normalizer import BatchResult, Normalizer, SourceRecord  # noqa: PLC0415

    class PrecomputedNormalizer(Normalizer):
        def __init__(self) -> None:
            super().__init__(settings, topics)
            self.known: dict[str, Any] = {}
            path = events_file or Path(os.environ["ONCOTWIN_BENCH_EVENTS"])
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            records = [SourceRecord(topics.event_topic(d["kind"]), 0, i, d["key"], d["value"].encode()) for i, d in enumerate(lines)]
            for start in range(0, len(records), 500):
                for o in super().process(records[start:start + 500]).observations:
                    self.known[o.event_id] = o

        def process(self, records: Any, seen: Any = None) -> Any:
            result = BatchResult()
            others = []
            for record in records:
                try:
                    known = self.known.get(orjson.loads(record.value or b"null")["event_id"])
                except (orjson.JSONDecodeError, TypeError, KeyError):
                    known = None
                if known is None:
                    others.append(record)
                elif seen is not None and seen(known.event_id):
                    result.duplicates.append((known.event_id, record))
                else:
                    result.observations.append(dataclasses.replace(known, source=record))
            if others:
                rest = super().process(others, seen)
                result.observations.extend(rest.observations)
                result.dead_letters.extend(rest.dead_letters)
                result.duplicates.extend(rest.duplicates)
            return result

    return PrecomputedNormalizer()


def bound_worker(without: str) -> int:
    """The normalizer worker (stream.agents) with one part swapped for one that costs nothing."""
    import logging  # noqa: PLC0415

    from stream.agents import run as run_normalizer  # noqa: PLC0415

    level = os.environ.get("ONCOTWIN_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parts = {"make_store": null_store} if without == "store" else {"make_normalizer": precomputed_normalizer}
    return run_normalizer(loglevel=level.lower(), **parts)


def run(
    records: int, record_bytes: int, partitions: int, patients: int = 1000, events: int = 10_000, bounds: bool = False
) -> tuple[list[StageResult], dict[str, Any]]:
    base = KafkaSettings.from_env(os.environ)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    settings, broker = ensure_broker(base.with_topic_prefix(prefix))
    try:
        topics = Topics.from_settings(settings)
        ensure_topics(settings, topics, partitions=partitions)
        ctx = BenchContext(
            settings=settings,
            topics=topics,
            records=records,
            record_bytes=record_bytes,
            patients=patients,
            broker="embedded tansu" if broker is not None else settings.bootstrap_servers,
            events=events,
        )
        ctx.state["broker_pid"] = broker.pid if broker is not None else None
        try:
            results = [stage(ctx) for stage in STAGES + (BOUNDS if bounds else [])]
        finally:
            for cleanup in reversed(ctx.cleanups):
                cleanup()
    finally:
        if broker is not None:
            broker.stop()
    summary: dict[str, Any] = {
        "bench": "stream",
        "broker": ctx.broker,
        "records": records,
        "record_bytes": record_bytes,
        "partitions": partitions,
    }
    for result in results:
        if result.name == "latency":
            continue
        summary[f"{result.name}_per_s"] = round(result.per_s, 1)
        summary[f"{result.name}_mb_per_s"] = round(result.mb_per_s, 2)
    summary.update(ctx.extra)
    rates = {r.name: r.per_s for r in results}
    if "normalizer" in rates and "faust_passthrough" in rates:
        summary["normalizer_vs_passthrough"] = round(rates["normalizer"] / rates["faust_passthrough"], 3)
        summary["events"] = events
        summary["targets_met"] = bool(summary["normalizer_vs_passthrough"] >= 0.5 and rates["normalizer"] >= 2000)
    for bound in BOUNDS:
        name = bound.__name__
        if name in rates and "faust_passthrough" in rates:
            summary[f"{name}_vs_passthrough"] = round(rates[name] / rates["faust_passthrough"], 3)
    return results, summary


def format_table(results: list[StageResult]) -> str:
    width = max([16] + [len(r.name) + 2 for r in results])
    lines = [f"{'stage':<{width}}{'records':>10}{'seconds':>10}{'records/s':>12}{'MB/s':>9}"]
    for r in results:
        lines.append(f"{r.name:<{width}}{r.records:>10}{r.seconds:>10.3f}{r.per_s:>12.0f}{r.mb_per_s:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024, help="record value size in bytes")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--events", type=int, default=10_000, help="clinical events for the faust and normalizer stages")
    parser.add_argument(
        "--bounds", action="store_true",
        help="also time the normalizer without its RDF store, and with its events' outcomes precomputed",
    )
    parser.add_argument("--worker", choices=["passthrough", "normalizer"], help=argparse.SUPPRESS)
    parser.add_argument("--without", choices=["store", "normalization"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "passthrough":
        return passthrough_worker()
    if args.worker == "normalizer":
        return bound_worker(args.without)
    results, summary = run(args.records, args.size, args.partitions, events=args.events, bounds=args.bounds)
    print(
        f"stream bench: {args.records} records of {args.size} B, {args.partitions} partitions, "
        f"broker {summary['broker']}"
    )
    print(format_table(results))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
