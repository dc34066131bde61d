"""Producer, consumer and topics against a real broker: records on real topics."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from confluent_kafka.admin import AdminClient

from stream import (
    BatchConsumer,
    DeliveryError,
    EmbeddedBroker,
    EventProducer,
    KafkaSettings,
    Record,
    Topics,
    ensure_topics,
    offsets_for_time,
    read_all,
    record_headers,
    timestamp_ms,
)

pytestmark = pytest.mark.integration

T0 = timestamp_ms(datetime(2025, 1, 6, 8, 0, tzinfo=timezone.utc))
MINUTE = 60_000


def produce(settings: KafkaSettings, topic: str, count: int, *, patients: int = 5) -> list[tuple[str, bytes, int]]:
    """``count`` records, one per minute of event time, over a few pseudonymous patients."""
    sent = []
    with EventProducer(settings) as producer:
        for i in range(count):
            key, value, ts = f"PSN-{i % patients:04d}", f'{{"seq": {i}}}'.encode(), T0 + i * MINUTE
            producer.send(topic, key, value, timestamp_ms=ts, headers=record_headers(event_id=f"evt-{i}"))
            sent.append((key, value, ts))
    assert producer.sent == count and producer.failed == 0
    return sent


def poll_until(consumer: BatchConsumer, count: int, timeout: float = 30.0) -> list[Record]:
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        records += consumer.poll_batch(max_records=count - len(records), timeout=0.5)
    return records


def test_ensure_topics_is_idempotent_and_waits_for_metadata(settings: KafkaSettings) -> None:
    topics = Topics.from_settings(settings)
    assert sorted(ensure_topics(settings, topics)) == sorted(topics.all())
    assert ensure_topics(settings, topics) == []
    assert ensure_topics(settings, [topics.lab, f"{settings.topic_prefix}.extra.v1"]) == [
        f"{settings.topic_prefix}.extra.v1"
    ]
    metadata = AdminClient(settings.client_config()).list_topics(timeout=10)
    for name in topics.all():
        assert len(metadata.topics[name].partitions) == settings.topic_partitions


def test_round_trip_preserves_key_value_headers_and_event_time(settings: KafkaSettings, topics: Topics) -> None:
    big = b"x" * 600_000  # a large record still travels whole
    occurred = timestamp_ms(datetime(2024, 11, 2, 14, 5, 7, 123_000, tzinfo=timezone.utc))
    headers = record_headers(schema_version=1, event_id="7f0c-test")
    with EventProducer(settings) as producer:
        producer.send(topics.lab, "PSN-0042", b'{"value": 4.2}', timestamp_ms=occurred, headers=headers)
        producer.send(topics.lab, "PSN-0042", big, timestamp_ms=occurred + 1)

    records = read_all(settings, topics.lab, timeout=15)
    assert [r.key for r in records] == ["PSN-0042", "PSN-0042"]
    first, second = records
    assert first.value == b'{"value": 4.2}'
    assert first.headers == headers
    assert first.timestamp_ms == occurred
    assert (second.value, second.headers, second.timestamp_ms) == (big, {}, occurred + 1)
    # one patient -> one partition, in order
    assert first.partition == second.partition and second.offset == first.offset + 1


def test_same_key_lands_in_one_partition_in_send_order(settings: KafkaSettings, topics: Topics) -> None:
    sent = produce(settings, topics.ctdna, 60, patients=6)
    records = read_all(settings, topics.ctdna, timeout=15)
    assert sorted((r.key, r.value, r.timestamp_ms) for r in records) == sorted(sent)
    for patient in {key for key, _, _ in sent}:
        mine = [r for r in records if r.key == patient]
        assert len({r.partition for r in mine}) == 1
        assert [r.timestamp_ms for r in mine] == sorted(r.timestamp_ms for r in mine)


def test_read_all_stops_at_max_records(settings: KafkaSettings, topics: Topics) -> None:
    produce(settings, topics.imaging, 30)
    assert len(read_all(settings, topics.imaging, timeout=15, max_records=7)) == 7


def test_record_refused_by_the_client_raises_delivery_error(settings: KafkaSettings, topics: Topics) -> None:
    producer = EventProducer(settings, config_overrides={"message.max.bytes": 2_000})
    producer.send(topics.lab, "PSN-0001", b"small", timestamp_ms=T0)
    with pytest.raises(DeliveryError) as caught:
        producer.send(topics.lab, "PSN-0002", b"y" * 10_000, timestamp_ms=T0)
    (failure,) = caught.value.failures
    assert (failure.topic, failure.key) == (topics.lab, "PSN-0002")
    assert "MSG_SIZE_TOO_LARGE" in failure.error
    producer.close()
    assert (producer.sent, producer.failed) == (1, 1)


def test_records_for_a_broker_that_is_gone_raise_delivery_error() -> None:
    with EmbeddedBroker() as broker:
        settings = KafkaSettings(topic_partitions=1).with_bootstrap(broker.bootstrap_servers)
        ensure_topics(settings, ["gone.v1"])
        producer = EventProducer(settings, config_overrides={"delivery.timeout.ms": 1_500})
        producer.send("gone.v1", "PSN-0001", b"before", timestamp_ms=T0)
        producer.flush(10)
    producer.send("gone.v1", "PSN-0002", b"after", timestamp_ms=T0)
    producer.send("gone.v1", "PSN-0003", b"after", timestamp_ms=T0)
    with pytest.raises(DeliveryError) as caught:
        producer.flush(10)
    assert {(f.topic, f.key) for f in caught.value.failures} == {("gone.v1", "PSN-0002"), ("gone.v1", "PSN-0003")}
    assert all("TIMED_OUT" in f.error for f in caught.value.failures)
    assert (producer.sent, producer.failed) == (1, 2)
    producer.close(1)

    # Still queued at close: reported, then purged instead of waiting out delivery.timeout.ms.
    stuck = EventProducer(settings, config_overrides={"delivery.timeout.ms": 60_000})
    stuck.send("gone.v1", "PSN-0004", b"never", timestamp_ms=T0)
    started = time.monotonic()
    with pytest.raises(DeliveryError, match="not acknowledged"):
        stuck.close(0.5)
    assert time.monotonic() - started < 5
    assert stuck.in_flight == 0


def test_commit_then_resume_in_the_same_group_loses_and_repeats_nothing(
    settings: KafkaSettings, topics: Topics
) -> None:
    sent = produce(settings, topics.treatment, 40)
    n = 17
    assigned: list[tuple[str, int]] = []
    revoked: list[tuple[str, int]] = []
    first = BatchConsumer(settings, [topics.treatment], on_assign=assigned.extend, on_revoke=revoked.extend)
    read = poll_until(first, 40)
    done = read[:n]
    committed = first.commit(done)
    assert first.committed(topics.treatment) == {p: o for (_, p), o in committed.items()}
    first.close()  # the uncommitted rest is "in flight" work that was never finished
    assert sorted(assigned) == [(topics.treatment, p) for p in range(3)]
    assert sorted(revoked) == sorted(assigned)

    with BatchConsumer(settings, [topics.treatment]) as second:
        rest = poll_until(second, 40 - n)
        assert second.poll_batch(timeout=1.0) == []

    ids = [(r.partition, r.offset) for r in done + rest]
    assert len(ids) == len(set(ids)) == 40, "records repeated or lost"
    assert sorted((r.key, r.value, r.timestamp_ms) for r in done + rest) == sorted(sent)


def test_seek_to_time_finds_the_first_record_at_or_after_a_time(settings: KafkaSettings, topics: Topics) -> None:
    produce(settings, topics.lab, 30)
    cut = T0 + 20 * MINUTE - 1  # between records 19 and 20
    offsets = offsets_for_time(settings, topics.lab, cut)
    assert set(offsets) == {0, 1, 2}

    # Group consumer, before the group assigned anything: applied on assignment.
    with BatchConsumer(settings, [topics.lab], group_id=f"{settings.consumer_group}-replay") as consumer:
        assert consumer.seek_to_time(topics.lab, cut) == offsets
        records = poll_until(consumer, 10)
        assert sorted(r.timestamp_ms for r in records) == [T0 + i * MINUTE for i in range(20, 30)]
        assert consumer.poll_batch(timeout=0.5) == []

        # Already assigned: moved at once (back to record 25).
        consumer.seek_to_time(topics.lab, T0 + 25 * MINUTE)
        again = poll_until(consumer, 5)
        assert sorted(r.timestamp_ms for r in again) == [T0 + i * MINUTE for i in range(25, 30)]

    # Manual assignment (replay without a group).
    with BatchConsumer(settings, group_id=f"{settings.consumer_group}-manual") as manual:
        assert manual.assign(topics.lab) == [0, 1, 2]
        manual.seek_to_time(topics.lab, T0 + 27 * MINUTE)
        assert sorted(r.timestamp_ms for r in poll_until(manual, 3)) == [T0 + i * MINUTE for i in (27, 28, 29)]

    # Past the last record: every partition positioned at its end.
    ends = offsets_for_time(settings, topics.lab, T0 + 10_000 * MINUTE)
    sizes = {p: 0 for p in range(3)}
    for record in read_all(settings, topics.lab, timeout=15):
        sizes[record.partition] += 1
    assert ends == sizes


def test_seek_to_time_uses_record_time_not_append_order(settings: KafkaSettings, topics: Topics) -> None:
    # A late event (earlier event time, appended last) is not what the lookup lands on.
    with EventProducer(settings) as producer:
        for minute in (0, 10, 20, 5):
            producer.send(topics.lab, "PSN-0007", b"{}", timestamp_ms=T0 + minute * MINUTE, partition=0)
    offsets = offsets_for_time(settings, topics.lab, T0 + 4 * MINUTE)
    assert offsets[0] == 1
    assert offsets_for_time(settings, topics.lab, T0 + 15 * MINUTE)[0] == 2
