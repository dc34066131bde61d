"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from stream import EmbeddedBroker, KafkaSettings


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaSettings]:
    """The embedded tansu broker, once per session; with ONCOTWIN_TEST_KAFKA=external the cluster
    of KAFKA_BOOTSTRAP_SERVERS instead (never picked up by accident from a developer's shell).
    Tests use topic prefixes of their own."""
    if os.environ.get("ONCOTWIN_TEST_KAFKA", "").strip().lower() == "external":
        settings = KafkaSettings.from_env()
        if settings.embedded:
            pytest.fail("ONCOTWIN_TEST_KAFKA=external needs KAFKA_BOOTSTRAP_SERVERS")
        yield settings
        return
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log") as broker:
        yield KafkaSettings.from_env({}).with_bootstrap(broker.bootstrap_servers)
