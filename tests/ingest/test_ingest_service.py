"""NormalizerService on the real broker and an on-disk store: a batch is reported durable only
once its graphs are stored and marked, storing overlaps the next batch, a duplicate of an event
still being stored is caught, and a failing store stops the service rather than losing data."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from ingest_support import module_settings

from schemas import example
from stream import KafkaSettings, Topics, ensure_topics, read_all
from stream.agents import NormalizerService, StoreWriter
from stream.normalizer import Normalizer, NormalizerSettings, SourceRecord
from stream.rdfstore import RdfStore

pytestmark = pytest.mark.integration


class GatedStore(RdfStore):
    """A real store whose background writes wait for the test to open a gate."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.fail = False

    def write(self, events):  # type: ignore[no-untyped-def]
        assert self.gate.wait(30)
        if self.fail:
            raise OSError("disk full")
        return super().write(events)


def _records(topics: Topics, ids: list[str]) -> list[SourceRecord]:
    out = []
    for offset, event_id in enumerate(ids):
        event = example("lab")
        event["event_id"] = event_id
        out.append(SourceRecord(topics.lab, 0, offset, event["patient_id"], json.dumps(event).encode()))
    return out


@pytest.fixture
def service(local_kafka: KafkaSettings, tmp_path: Path):  # type: ignore[no-untyped-def]
    kafka = module_settings(local_kafka, partitions=1)
    topics = Topics.from_settings(kafka)
    ensure_topics(kafka, topics, partitions=1)
    store = GatedStore(tmp_path / "rdf")
    svc = NormalizerService(kafka, Normalizer(NormalizerSettings(imaging_root=tmp_path), topics), store)
    yield svc, store, kafka, topics
    store.gate.set()
    svc.close()


def _id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def test_a_batch_is_durable_only_once_stored_and_duplicates_in_flight_are_caught(service) -> None:  # type: ignore[no-untyped-def]
    svc, store, kafka, topics = service
    durable: list[int] = []
    first = svc.handle(_records(topics, [_id(1), _id(2)]), lambda: durable.append(1))
    assert len(first.observations) == 2
    assert durable == [] and not store.contains_event(_id(1))  # published, not yet stored
    # The next batch is handled while the first waits for the store; its copy of event 2 is
    # recognised although the store does not hold it yet.
    second = svc.handle(_records(topics, [_id(2), _id(3)]), lambda: durable.append(2))
    assert [eid for eid, _ in second.duplicates] == [_id(2)]
    assert len(second.observations) == 1
    store.gate.set()
    svc.drain()
    assert durable == [1, 2]
    assert all(store.contains_event(_id(i)) for i in (1, 2, 3))
    published = read_all(kafka, topics.observations, timeout=20, idle_timeout=1.0)
    assert sorted(r.headers["event-id"] for r in published) == [_id(1), _id(2), _id(3)]


def test_a_failing_store_stops_the_service_and_the_batch_is_never_durable(service) -> None:  # type: ignore[no-untyped-def]
    svc, store, _kafka, topics = service
    durable: list[int] = []
    svc.handle(_records(topics, [_id(11)]), lambda: durable.append(1))
    store.fail = True
    store.gate.set()
    with pytest.raises(OSError, match="disk full"):
        svc.drain()
    assert durable == [] and not store.contains_event(_id(11))


def test_batches_that_queue_up_are_stored_together_and_reported_in_order() -> None:
    calls: list[list[str]] = []
    gate, busy = threading.Event(), threading.Event()

    def store(graphs: list[tuple[str, str]]) -> None:
        busy.set()
        assert gate.wait(30)
        calls.append([eid for eid, _ in graphs])

    writer = StoreWriter(store)
    order: list[str] = []
    futures = [writer.submit([("e0", "")], lambda: order.append("b0"))]
    assert busy.wait(30)  # the writer is storing the first batch when the others arrive
    futures += [writer.submit([(f"e{i}", "")], lambda i=i: order.append(f"b{i}")) for i in range(1, 4)]
    gate.set()
    for f in futures:
        f.result(30)
    writer.close()
    assert [e for call in calls for e in call] == ["e0", "e1", "e2", "e3"]
    assert len(calls) == 2  # the first batch alone, the three that waited behind it together
    assert order == ["b0", "b1", "b2", "b3"]


def test_the_writer_gathers_batches_up_to_its_size_or_time_and_hurries_on_demand() -> None:
    import time

    calls: list[list[str]] = []

    def store(graphs: list[tuple[str, str]]) -> None:
        calls.append([eid for eid, _ in graphs])

    writer = StoreWriter(store, min_events=4, within_s=30.0)
    futures = [writer.submit([(f"a{i}", ""), (f"b{i}", "")], None) for i in range(2)]  # 4 events: enough
    for f in futures:
        f.result(10)
    assert calls == [["a0", "b0", "a1", "b1"]]
    # Fewer than min_events wait (here up to 30 s) until someone hurries the writer.
    late = writer.submit([("c0", "")], None)
    time.sleep(0.3)
    assert len(calls) == 1 and not late.done()
    start = time.monotonic()
    writer.hurry()
    late.result(10)
    assert time.monotonic() - start < 5 and calls[-1] == ["c0"]
    writer.close()

    quick = StoreWriter(lambda graphs: calls.append([e for e, _ in graphs]), min_events=100, within_s=0.05)
    quick.submit([("d0", "")], None).result(10)  # the wait ends after within_s
    quick.close()
    assert calls[-1] == ["d0"]
