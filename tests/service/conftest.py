"""Fixtures of the worker tests: one embedded broker for the session, a small normalized virtual
cohort, and per test its own topic prefix, consumer group and state directory."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from service_support import Cohort, ObservationRecord, Reference, reference_run
from stream import KafkaSettings, Topics, ensure_topics

PARTITIONS = 3


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs a Kafka-protocol broker (embedded tansu by default)")
    # rdflib's JSON-LD parser (the decoder's fallback for foreign documents) warns about itself.
    config.addinivalue_line("filterwarnings", "ignore:ConjunctiveGraph is deprecated:DeprecationWarning")


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> Iterator[None]:
    # Developers share two cores: keep intra-op threads from oversubscribing them.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def settings(local_kafka: KafkaSettings) -> KafkaSettings:
    prefix = f"svc-{uuid.uuid4().hex[:10]}"
    return replace(local_kafka, topic_prefix=prefix, consumer_group=f"{prefix}-workers", topic_partitions=PARTITIONS)


@pytest.fixture
def topics(settings: KafkaSettings) -> Topics:
    names = Topics.from_settings(settings)
    ensure_topics(settings, names)
    return names


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """Two virtual patients (16³ voxels of 5 mm, 120 days) through the real normalizer."""
    from models import Grid  # noqa: PLC0415
    from models.virtual_patient import CohortConfig, generate_cohort  # noqa: PLC0415
    from stream.eventlog import read_events  # noqa: PLC0415
    from stream.normalizer import Normalizer, NormalizerSettings, SourceRecord  # noqa: PLC0415
    from stream.virtual_feed import write_cohort  # noqa: PLC0415

    root = tmp_path_factory.mktemp("cohort")
    config = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=120, truth_margin_days=10)
    written = write_cohort(generate_cohort(2, seed=11, config=config), root)
    events = read_events(written.events_path)
    raw_topics = Topics("cohort")
    normalizer = Normalizer(NormalizerSettings(imaging_root=root), raw_topics)
    sources = [
        SourceRecord(raw_topics.event_topic(e["kind"]), 0, offset, e["patient_id"], json.dumps(e).encode())
        for offset, e in enumerate(events)
    ]
    result = normalizer.process(sources)
    assert not result.dead_letters, [d.reason for d in result.dead_letters]
    records = [
        ObservationRecord(o.event_id, o.patient_id, o.kind, o.value, dict(o.headers), o.timestamp_ms)
        for o in result.observations
    ]
    records.sort(key=lambda r: (r.timestamp_ms, r.event_id))
    return Cohort(root, records)


@pytest.fixture(scope="session")
def reference_state(cohort: Cohort) -> Reference:
    """The engine's in-order run over the whole log, without Kafka: what every run must match."""
    return reference_run(cohort)


@pytest.fixture(scope="session")
def reference(reference_state: Reference) -> dict[str, dict]:
    """Final forecast record per patient (without issued_at) of the reference run."""
    return reference_state.forecasts
