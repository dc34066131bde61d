"""The same round trip on Apache Kafka (KRaft) in a testcontainers container.

Skipped where no Docker engine answers; run anywhere with Docker, or force the whole suite
onto it with ONCOTWIN_TEST_KAFKA=testcontainers.
"""

from __future__ import annotations

import pytest

from stream import BatchConsumer, EventProducer, KafkaSettings, Topics, ensure_topics, record_headers

pytestmark = pytest.mark.integration


def test_round_trip_and_commit_on_apache_kafka(apache_kafka: KafkaSettings) -> None:
    settings = apache_kafka.with_topic_prefix("tc")
    topics = Topics.from_settings(settings)
    assert set(ensure_topics(settings, topics, partitions=3)) == set(topics.all())
    with EventProducer(settings) as producer:
        for i in range(10):
            key = f"PSN-{i % 3:04d}"
            producer.send(topics.lab, key, b"{}", timestamp_ms=1_700_000_000_000 + i, headers=record_headers())
    with BatchConsumer(settings, [topics.lab], group_id="tc-group") as consumer:
        records = []
        while len(records) < 10:
            records += consumer.poll_batch(10, timeout=2.0)
        consumer.commit(records)
        assert sum(consumer.committed(topics.lab).values()) == 10
    assert sorted(r.timestamp_ms for r in records) == [1_700_000_000_000 + i for i in range(10)]
