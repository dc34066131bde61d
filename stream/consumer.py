"""A batch consumer with explicit commits, and client-side lookup of offsets by time.

Offsets are committed only when the caller says its work is durable (DESIGN §6), so nothing
here commits on its own. Seeking by time scans record timestamps on the client: tansu's
ListOffsets ignores timestamps, and event-time timestamps are not monotonic within a
partition anyway (late events), which rules out a binary search over offsets.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from stream.settings import KafkaSettings

log = logging.getLogger(__name__)

Partition = tuple[str, int]
"""(topic, partition)."""

RebalanceHook = Callable[[list[Partition]], None]


class ConsumerError(RuntimeError):
    """A fatal consumer error, a failed commit, or a topic that cannot be read."""


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    headers: dict[str, str] = field(default_factory=dict)
    timestamp_ms: int | None = None


def to_record(message: Message) -> Record:
    key = message.key()
    ts_type, ts = message.timestamp()
    raw_headers = message.headers() or []
    return Record(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        # Keys are pseudonyms we wrote as UTF-8; a foreign byte must not stop the consumer.
        key=key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
        value=message.value(),
        headers={name: (b or b"").decode("utf-8", "replace") for name, b in raw_headers},
        timestamp_ms=None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
    )


def next_offsets(records: Iterable[Record]) -> dict[Partition, int]:
    """The offset to commit per partition: one past the highest record seen."""
    offsets: dict[Partition, int] = {}
    for record in records:
        tp = (record.topic, record.partition)
        if record.offset + 1 > offsets.get(tp, -1):
            offsets[tp] = record.offset + 1
    return offsets


class BatchConsumer:
    """``confluent_kafka.Consumer`` reading micro-batches, committing only on request.

    Either ``subscribe`` (consumer group: partitions are spread over the members) or
    ``assign`` (this consumer reads every partition itself, e.g. replay).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: Iterable[str] = (),
        *,
        group_id: str | None = None,
        on_assign: RebalanceHook | None = None,
        on_revoke: RebalanceHook | None = None,
        on_lost: RebalanceHook | None = None,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        config = settings.consumer_config(group_id)
        config.update(config_overrides or {})
        self._settings = settings
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy", ""))
        self._consumer = Consumer(config)
        self.group_id: str = config["group.id"]
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_lost = on_lost
        # Start offsets for partitions the group has not assigned to us yet (seek_to_time).
        self._start_offsets: dict[Partition, int] = {}
        self._closed = False
        topics = list(topics)
        if topics:
            self.subscribe(topics)

    # -- assignment --------------------------------------------------------------------

    def subscribe(self, topics: Sequence[str]) -> None:
        self._consumer.subscribe(
            list(topics), on_assign=self._handle_assign, on_revoke=self._handle_revoke, on_lost=self._handle_lost
        )

    def assign(self, topic: str, start: Mapping[int, int] | None = None, *, timeout: float = 10.0) -> list[int]:
        """Read every partition of ``topic`` without a group; ``start`` maps partition -> offset
        (default: the committed offset of this group id, else auto.offset.reset)."""
        partitions = partitions_of(self._consumer, topic, timeout)
        start = start or {}
        self._consumer.assign(
            [TopicPartition(topic, p, start[p]) if p in start else TopicPartition(topic, p) for p in partitions]
        )
        return partitions

    def assignment(self) -> list[Partition]:
        return [(tp.topic, tp.partition) for tp in self._consumer.assignment()]

    # -- reading -----------------------------------------------------------------------

    def poll_batch(self, max_records: int = 500, timeout: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records: whatever is fetched already, else waiting at most
        ``timeout`` seconds for the first one to arrive. Never waits to fill the batch."""
        messages = take(self._consumer, max_records, timeout)
        records: list[Record] = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(to_record(message))
            elif error.code() == KafkaError._PARTITION_EOF:
                continue
            elif error.fatal():
                raise ConsumerError(f"fatal consumer error: {error.str()}")
            else:
                # e.g. a subscribed topic not created yet: librdkafka keeps trying.
                log.warning("consumer error (continuing): %s", error.str())
        return records

    # -- offsets -----------------------------------------------------------------------

    def commit(self, records: Iterable[Record]) -> dict[Partition, int]:
        """Synchronously commit, per partition, the offset after the last of ``records``."""
        return self.commit_offsets(next_offsets(records))

    def commit_offsets(self, offsets: Mapping[Partition, int]) -> dict[Partition, int]:
        if not offsets:
            return {}
        tps = [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        try:
            result = self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            raise ConsumerError(f"commit failed: {exc.args[0].str()}") from exc
        failed = [tp for tp in result or [] if tp.error is not None]
        if failed:
            raise ConsumerError(
                "commit failed for " + ", ".join(f"{tp.topic}[{tp.partition}]: {tp.error.str()}" for tp in failed)
            )
        return dict(offsets)

    def committed(self, topic: str, *, timeout: float = 10.0) -> dict[int, int]:
        """This group's committed offset per partition of ``topic`` (absent: none committed)."""
        partitions = partitions_of(self._consumer, topic, timeout)
        result = self._consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
        return {tp.partition: tp.offset for tp in result if tp.offset >= 0}

    def seek_to_time(self, topic: str, ts_ms: int, *, timeout: float = 30.0) -> dict[int, int]:
        """Position every partition of ``topic`` at its first record with timestamp >= ``ts_ms``.

        Partitions assigned now are moved at once; the others start there when the group
        assigns them to this consumer. Returns partition -> offset.
        """
        offsets = offsets_for_time(self._settings, topic, ts_ms, timeout=timeout)
        assigned = {p for t, p in self.assignment() if t == topic}
        for partition, offset in offsets.items():
            if partition in assigned:
                self._seek(TopicPartition(topic, partition, offset), timeout)
            else:
                self._start_offsets[(topic, partition)] = offset
        return offsets

    def _seek(self, tp: TopicPartition, timeout: float) -> None:
        # Right after an assignment librdkafka refuses to seek until the fetcher has started
        # (_STATE); it settles within a few polls.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._consumer.seek(tp)
                return
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._STATE or time.monotonic() >= deadline:
                    raise ConsumerError(f"cannot seek {tp.topic}[{tp.partition}]: {exc.args[0].str()}") from exc
                time.sleep(0.05)

    # -- rebalance ---------------------------------------------------------------------

    def _handle_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        moved = False
        for tp in partitions:
            start = self._start_offsets.pop((tp.topic, tp.partition), None)
            if start is not None:
                tp.offset = start
                moved = True
        if moved:
            # confluent-kafka assigns the original list unless the callback assigns itself.
            if self._cooperative:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
        if self.on_assign is not None:
            self.on_assign([(tp.topic, tp.partition) for tp in partitions])

    def _handle_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # The hook runs while the partitions are still ours: its commits still count.
        if self.on_revoke is not None:
            self.on_revoke([(tp.topic, tp.partition) for tp in partitions])

    def _handle_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions belong to someone else already: committing would fail, so the
        # hook can only drop local state. Without an on_lost hook, on_revoke is told.
        hook = self.on_lost or self.on_revoke
        if hook is not None:
            hook([(tp.topic, tp.partition) for tp in partitions])

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Leave the group (partitions are reassigned at once) and release the client."""
        if not self._closed:
            self._closed = True
            self._consumer.close()

    def __enter__(self) -> BatchConsumer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- helpers without a group ---------------------------------------------------------


def take(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Up to ``max_messages`` messages, returning as soon as at least one is there.

    ``Consumer.consume`` waits for the whole timeout unless the batch fills, which would add
    ``timeout`` of latency to every partly filled batch.
    """
    if max_messages <= 0:
        return []
    messages = consumer.consume(num_messages=max_messages, timeout=0)
    if messages:
        return messages
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(num_messages=max_messages - 1, timeout=0)] if max_messages > 1 else [first]


def partitions_of(client: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    metadata = client.list_topics(topic, timeout=timeout)
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        reason = info.error.str() if info is not None and info.error is not None else "no partitions"
        raise ConsumerError(f"topic {topic} cannot be read: {reason}")
    return sorted(info.partitions)


def _scanner(settings: KafkaSettings) -> Consumer:
    # A throwaway group id: librdkafka insists on one, but nothing is ever committed with it.
    config = settings.consumer_config(f"oncotwin-scan-{uuid.uuid4().hex}")
    config["enable.partition.eof"] = True
    return Consumer(config)


def offsets_for_time(settings: KafkaSettings, topic: str, ts_ms: int, *, timeout: float = 30.0) -> dict[int, int]:
    """Per partition of ``topic``: the first offset whose record timestamp is >= ``ts_ms``,
    or the end offset where no record is that late (Kafka's offsetsForTimes semantics).

    Reads each partition from its beginning until it finds one; the end of a partition is
    recognised from the fetch responses (partition EOF), not from ListOffsets.
    """
    consumer = _scanner(settings)
    try:
        partitions = partitions_of(consumer, topic, timeout)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(partitions):
            if time.monotonic() >= deadline:
                missing = sorted(set(partitions) - set(found))
                raise TimeoutError(f"offsets_for_time({topic}): partitions {missing} not scanned in {timeout:g}s")
            for message in take(consumer, 10_000, 0.5):
                partition = message.partition()
                if partition in found:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        found[partition] = message.offset()
                    elif error.fatal():
                        raise ConsumerError(f"fatal consumer error: {error.str()}")
                    continue
                ts_type, ts = message.timestamp()
                if ts_type != TIMESTAMP_NOT_AVAILABLE and ts >= ts_ms:
                    found[partition] = message.offset()
                    # Stop fetching a resolved partition: the rest of it is not needed.
                    consumer.incremental_unassign([TopicPartition(topic, partition)])
        return found
    finally:
        consumer.close()


def read_all(
    settings: KafkaSettings,
    topic: str,
    timeout: float = 10.0,
    max_records: int | None = None,
    *,
    idle_timeout: float = 2.0,
) -> list[Record]:
    """Every record of ``topic`` from the beginning, in per-partition order, without a group.

    Stops when all partitions reached their end, when ``max_records`` were read, when no
    record came for ``idle_timeout`` seconds, or after ``timeout`` seconds.
    """
    consumer = _scanner(settings)
    try:
        partitions = partitions_of(consumer, topic, timeout)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Record] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        last_progress = time.monotonic()
        while len(at_end) < len(partitions):
            now = time.monotonic()
            if now >= deadline or now - last_progress >= idle_timeout:
                break
            wanted = 10_000 if max_records is None else min(10_000, max_records - len(records))
            if wanted <= 0:
                break
            for message in take(consumer, wanted, min(0.5, idle_timeout)):
                error = message.error()
                if error is None:
                    records.append(to_record(message))
                    at_end.discard(message.partition())
                    last_progress = time.monotonic()
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                    last_progress = time.monotonic()
                elif error.fatal():
                    raise ConsumerError(f"fatal consumer error: {error.str()}")
        return records[:max_records] if max_records is not None else records
    finally:
        consumer.close()
