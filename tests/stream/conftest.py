"""Broker fixtures for the stream tests.

``kafka_settings`` (session) points at a real Kafka-protocol broker, chosen by
ONCOTWIN_TEST_KAFKA:

- ``auto`` (default): a testcontainers Apache Kafka (KRaft) where a Docker engine answers,
  else the embedded tansu broker;
- ``embedded``: the embedded tansu broker;
- ``testcontainers``: testcontainers Kafka, failing when no Docker engine answers;
- ``external``: the cluster in KAFKA_BOOTSTRAP_SERVERS (tests create prefixed topics there).

Each test gets its own topic prefix and consumer group, so tests never see each other's records.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from stream import EmbeddedBroker, KafkaSettings, Topics, ensure_topics

TEST_PARTITIONS = 3


def pytest_configure(config: pytest.Config) -> None:
    # Also declared in pyproject.toml; repeated so that this folder runs on its own.
    config.addinivalue_line("markers", "integration: needs a Kafka-protocol broker (embedded tansu by default)")


def docker_reachable() -> tuple[bool, str]:
    """(True, "") when a Docker engine answers a ping, else (False, why not)."""
    try:
        import docker  # noqa: PLC0415

        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
        return True, ""
    except Exception as exc:  # noqa: BLE001  (any failure means "no engine")
        return False, f"{type(exc).__name__}: {exc}"


@contextmanager
def testcontainers_kafka() -> Iterator[KafkaSettings]:
    """Apache Kafka in KRaft mode in a throwaway container."""
    from testcontainers.community.kafka import KafkaContainer  # noqa: PLC0415

    with KafkaContainer().with_kraft() as kafka:
        yield KafkaSettings.from_env({}).with_bootstrap(kafka.get_bootstrap_server())


@contextmanager
def embedded_kafka(log_dir: Path) -> Iterator[KafkaSettings]:
    with EmbeddedBroker(log_path=log_dir / "tansu.log") as broker:
        yield KafkaSettings.from_env({}).with_bootstrap(broker.bootstrap_servers)


@pytest.fixture(scope="session")
def kafka_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaSettings]:
    mode = os.environ.get("ONCOTWIN_TEST_KAFKA", "auto").strip().lower() or "auto"
    if mode == "external":
        settings = KafkaSettings.from_env()
        if settings.embedded:
            pytest.fail("ONCOTWIN_TEST_KAFKA=external needs KAFKA_BOOTSTRAP_SERVERS")
        yield settings
        return
    use_docker = False
    if mode in ("auto", "testcontainers"):
        use_docker, why_not = docker_reachable()
        if mode == "testcontainers" and not use_docker:
            pytest.fail(f"ONCOTWIN_TEST_KAFKA=testcontainers but no Docker engine reachable: {why_not}")
    elif mode != "embedded":
        pytest.fail(f"ONCOTWIN_TEST_KAFKA must be auto, embedded, testcontainers or external, not {mode!r}")
    if use_docker:
        with testcontainers_kafka() as settings:
            yield settings
    else:
        with embedded_kafka(tmp_path_factory.mktemp("broker")) as settings:
            yield settings


@pytest.fixture(scope="session")
def apache_kafka() -> Iterator[KafkaSettings]:
    """Apache Kafka (KRaft) through testcontainers, whatever ONCOTWIN_TEST_KAFKA says;
    skipped where no Docker engine answers."""
    reachable, why_not = docker_reachable()
    if not reachable:
        pytest.skip(f"no Docker engine reachable: {why_not}")
    with testcontainers_kafka() as settings:
        yield settings


@pytest.fixture
def topic_prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(kafka_settings: KafkaSettings, topic_prefix: str) -> KafkaSettings:
    """Session broker, this test's own topic prefix and consumer group."""
    return replace(
        kafka_settings,
        topic_prefix=topic_prefix,
        consumer_group=f"{topic_prefix}-group",
        topic_partitions=TEST_PARTITIONS,
    )


@pytest.fixture
def topics(settings: KafkaSettings) -> Topics:
    """This test's topics, created (3 partitions each)."""
    names = Topics.from_settings(settings)
    ensure_topics(settings, names)
    return names
