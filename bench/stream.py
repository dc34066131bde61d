"""Streaming benchmark: records per second through Kafka, stage by stage.

    python -m bench.stream [--records 20000] [--size 1024] [--partitions 6]

Uses KAFKA_BOOTSTRAP_SERVERS when set, else the embedded tansu broker. Prints a table, then
as its last line one JSON object ({"bench": "stream", "raw_produce_per_s": ..., ...}).

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


# Later: faust_passthrough (agent copying lab -> observations), normalize (JSON -> RDF),
# end_to_end_latency (p50/p99 from record timestamp to consumer).
STAGES: list[Stage] = [raw_produce, raw_consume]


def run(
    records: int, record_bytes: int, partitions: int, patients: int = 1000
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
        )
        results = [stage(ctx) for stage in STAGES]
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
        summary[f"{result.name}_per_s"] = round(result.per_s, 1)
        summary[f"{result.name}_mb_per_s"] = round(result.mb_per_s, 2)
    summary.update(ctx.extra)
    return results, summary


def format_table(results: list[StageResult]) -> str:
    lines = [f"{'stage':<16}{'records':>10}{'seconds':>10}{'records/s':>12}{'MB/s':>9}"]
    for r in results:
        lines.append(f"{r.name:<16}{r.records:>10}{r.seconds:>10.3f}{r.per_s:>12.0f}{r.mb_per_s:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=1024, help="record value size in bytes")
    parser.add_argument("--partitions", type=int, default=6)
    args = parser.parse_args(argv)
    results, summary = run(args.records, args.size, args.partitions)
    print(
        f"stream bench: {args.records} records of {args.size} B, {args.partitions} partitions, "
        f"broker {summary['broker']}"
    )
    print(format_table(results))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
