"""No record stalls the worker on the observations topic (issue 14): hostile JSON-LD, a record
keyed by another patient, keys and values near the broker's limit, bytes that are not UTF-8,
empty values and garbage headers each become one dead letter, the valid observations among them
are applied, every record is accounted for in the metrics, the logs quote no pseudonym or
value, and a stop ends a batch the brokers do not acknowledge within a bounded time, leaving
it uncommitted."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Producer
from service_support import ENGINE, Cohort, ObservationRecord, committed, publish, wait_for

from assimilation.engine import Engine
from assimilation.store import StateStore
from stream import KafkaSettings, Topics, read_all
from stream.producer import EventProducer
from stream.worker import Worker

pytestmark = pytest.mark.integration


def _worker(settings: KafkaSettings, topics: Topics, state_dir: Path, root: Path, **options) -> Worker:
    engine = Engine(StateStore(state_dir.resolve().as_uri()), ENGINE)
    return Worker(settings, engine, topics, root, max_batch=16, poll_timeout=0.2, **options)


def _renamed(record: ObservationRecord) -> bytes:
    """The record's JSON-LD as another event (a fresh event id), otherwise the same."""
    return record.value.replace(record.event_id.encode(), str(uuid.uuid4()).encode())


def _edited(record: ObservationRecord, name: str, value: object) -> bytes:
    """The record as another event, with ``name`` set to ``value`` wherever a node has it."""
    doc = json.loads(_renamed(record))
    for node in doc["@graph"]:
        if name in node:
            node[name] = value
    return json.dumps(doc).encode()


def _hostile(cohort: Cohort, pid: str, other: str) -> list[tuple[str, bytes | None, bytes | None, list]]:
    """(name, key, value, headers) of records that must each become one dead letter."""
    lab = next(r for r in cohort.of(pid) if r.kind == "lab")
    own_context = json.loads(_renamed(lab))
    own_context["@context"] = {"@vocab": "http://example.org/"}
    key = pid.encode()
    return [
        ("a date that is not one", key,
         _edited(lab, "fhir:effectiveDateTime", {"@value": "not a date", "@type": "xsd:dateTime"}), []),
        ("a quantity that is not one", key, _edited(lab, "fhir:valueQuantity", {"fhir:value": "DOE^JOHN"}), []),
        ("an event IRI that is not one", key, _edited(lab, "prov:wasDerivedFrom", {"@id": "urn:uuid:DOE^JOHN"}), []),
        ("a pseudonym that is not one", key, _edited(lab, "ot:pseudonym", "DOE^JOHN"), []),
        ("a context of its own", key, json.dumps(own_context).encode(), []),
        ("no graph", key, b'{"@context": {}, "@id": "urn:x"}', []),
        ("JSON that is not an object", key, b'"DOE^JOHN"', []),
        ("deep nesting", key, b'{"@graph": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", []),
        ("another patient's key", other.encode(), _renamed(lab), []),
        ("a key of 1 MB", b"DOE^JOHN" * 125_000, _renamed(lab), []),
        ("a value near the limit", key, b'{"@graph": [{"@id": "' + b"D" * 1_500_000 + b'"}]}', []),
        ("not UTF-8", key, b"\xff\xfe\x00DOE^JOHN\x80", []),
        ("empty", key, b"", []),
        ("no value", key, None, []),
        ("garbage headers", key, b"{}", [(f"h\x00{i}", bytes(range(256)) * 4) for i in range(300)]),
    ]


def test_hostile_records_each_give_one_dead_letter_and_the_rest_is_applied(
    settings, topics, state_dir, cohort: Cohort, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    pid, other = cohort.patients
    good = cohort.of(pid)[:6]
    hostile = _hostile(cohort, pid, other)
    publish(settings, topics, good[:3])
    # A plain librdkafka producer, as a foreign client would send them (up to tansu's limits).
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "message.max.bytes": 3_000_000})
    where: dict[int, tuple[int, int]] = {}
    for i, (_, key, value, headers) in enumerate(hostile):
        producer.produce(topics.observations, key=key, value=value, headers=headers, timestamp=good[2].timestamp_ms,
                         on_delivery=lambda err, msg, i=i: where.__setitem__(i, (msg.partition(), msg.offset())))
    assert producer.flush(30) == 0 and len(where) == len(hostile)
    publish(settings, topics, good[3:])

    worker = _worker(settings, topics, state_dir, cohort.root, metrics_port=0)
    with worker:
        worker.run_until_idle(idle_s=1.5, timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()

    letters = [json.loads(r.value) for r in read_all(settings, topics.deadletter, timeout=20, idle_timeout=1.0)]
    by_source = Counter((d["source"]["partition"], d["source"]["offset"]) for d in letters)
    for i, (name, *_rest) in enumerate(hostile):
        assert by_source[where[i]] == 1, f"{name}: {by_source[where[i]]} dead letters"
    assert len(letters) == len(hostile) == worker.summary.dead_letters
    assert all(d["reason"] and d["stage"] in ("decode", "routing", "claim-check", "nifti", "adapt") for d in letters)
    twin = worker.store.latest(pid)
    assert twin is not None and set(twin.applied) == {r.event_id for r in good}

    def metric(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    records = metric("oncotwin_worker_records_total")
    assert records == len(good) + len(hostile)
    assert metric("oncotwin_worker_records_accounted_total") == records
    assert metric('oncotwin_worker_records_accounted_total{outcome="dead_letter"}') == len(hostile)

    # The worker's log lines name records by topic, partition and offset: no pseudonym, no value.
    lines = [logging.Formatter("%(name)s %(message)s").format(r) for r in caplog.records if r.name.startswith("stream.")]
    assert any("dead letter" in line for line in lines)
    for line in lines:
        assert not re.search(r"DOE|VP-\d{4}", line), line


def test_a_stop_gives_up_a_batch_the_brokers_do_not_acknowledge_within_a_bounded_time(
    settings, topics, state_dir, cohort: Cohort
):
    pid = cohort.patients[0]
    publish(settings, topics, [ObservationRecord("-", pid, "lab", b"not JSON-LD", {}, cohort.records[0].timestamp_ms)])
    worker = _worker(settings, topics, state_dir, cohort.root)
    # Its dead letter goes to brokers that are not there: nothing is ever acknowledged.
    worker._producer = EventProducer(replace(settings, bootstrap_servers="127.0.0.1:1"))
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    wait_for(lambda: worker._batch_started is not None, 60, what="a batch in progress")
    time.sleep(0.5)
    started = time.monotonic()
    stop.set()
    thread.join(15)
    assert not thread.is_alive() and time.monotonic() - started < 10
    assert committed(settings, topics.observations, settings.consumer_group) == {}
    assert worker.summary.batches == 0 and worker.summary.records == 0
