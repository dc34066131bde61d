"""NormalizerService publishing and duplicates (issue 14): a retry sends only what was not
acknowledged; an observation the brokers refuse for good becomes a dead letter instead of being
retried forever; an event id reused with other content is a dead letter of stage duplicate
while a redelivered copy is a counted duplicate; every record is accounted for; logs never quote
a record's values; close() returns within its bound even when nothing can be acknowledged."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from ingest_support import module_settings

from schemas import example
from stream import KafkaSettings, Record, Topics, ensure_topics, read_all
from stream.agents import Abandoned, Counters, NormalizerService, content_digest
from stream.normalizer import Normalizer, NormalizerSettings, SourceRecord
from stream.producer import DeliveryFailure
from stream.rdfstore import RdfStore
from stream.shapes import ShapeValidator, Violation


def _lab(value: float = 5.0, patient: str = "VP-0002", event_id: str | None = None) -> dict:
    event = example("lab")
    event["event_id"] = event_id or str(uuid.uuid4())
    event["patient_id"] = patient
    event["body"]["value"] = value
    return event


class Feed:
    """Source records with increasing offsets on one topic."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.offset = 0

    def record(self, value: bytes, key: str | None = "VP-0002", headers: dict | None = None) -> SourceRecord:
        self.offset += 1
        return SourceRecord(self.topics.lab, 0, self.offset, key, value, headers or {}, 1700000000000)

    def event(self, event: dict, **kw) -> SourceRecord:
        return self.record(json.dumps(event).encode(), key=kw.pop("key", event["patient_id"]), **kw)


@dataclass
class Setup:
    kafka: KafkaSettings
    topics: Topics
    feed: Feed
    store: RdfStore

    def service(self, normalizer: Normalizer | None = None, **options) -> NormalizerService:
        normalizer = normalizer or Normalizer(NormalizerSettings(), self.topics)
        return NormalizerService(self.kafka, normalizer, self.store, retry_pause_s=0.05, **options)

    def read(self, topic: str) -> list[Record]:
        return read_all(self.kafka, topic, timeout=20, idle_timeout=1.0)


@pytest.fixture
def setup(local_kafka: KafkaSettings, tmp_path: Path) -> Setup:
    kafka = module_settings(local_kafka, partitions=1)
    topics = Topics.from_settings(kafka)
    ensure_topics(kafka, topics, partitions=1)
    return Setup(kafka, topics, Feed(topics), RdfStore(tmp_path / "rdf"))


def _accounted(counters: Counters) -> None:
    assert counters.records == counters.observations + counters.dead_letters + counters.duplicates, counters


def _dead_letters(setup: Setup) -> dict[int, dict]:
    """Source offset -> dead letter document."""
    out: dict[int, dict] = {}
    for r in setup.read(setup.topics.deadletter):
        doc = json.loads(r.value)
        assert doc["source"]["offset"] not in out, "two dead letters for one record"
        out[doc["source"]["offset"]] = doc
    return out


# -- publishing ------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_retry_sends_only_what_was_not_acknowledged(setup: Setup) -> None:
    svc = setup.service()
    calls: list[int] = []
    real = svc._producer.deliver

    def lossy(records, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(records))
        if len(calls) > 1:
            return real(records, **kw)
        # The first time, the brokers "acknowledge" every other record only.
        sent = real(records[::2], **kw)
        out = [DeliveryFailure(r.topic, r.key, "simulated: _MSG_TIMED_OUT") for r in records]
        out[::2] = sent
        return out

    svc._producer.deliver = lossy  # type: ignore[method-assign]
    events = [_lab(float(i)) for i in range(6)]
    batch = [setup.feed.event(e) for e in events] + [setup.feed.record(b"{not json"), setup.feed.record(b"")]
    try:
        result = svc.handle(batch)
    finally:
        svc.close()
    assert calls == [8, 4]  # the second attempt carried the four that failed, nothing else
    assert len(result.observations) == 6 and len(result.dead_letters) == 2
    published = [r.headers["event-id"] for r in setup.read(setup.topics.observations)]
    assert sorted(published) == sorted(e["event_id"] for e in events)  # each exactly once
    assert sorted(_dead_letters(setup)) == [7, 8]
    _accounted(svc.counters)


class Refused(Normalizer):
    """A normalizer whose observations for chosen events the brokers must refuse: one too large
    for a record, one with an event time before 1970 (as if the contract let either through)."""

    too_large: set[str] = set()
    too_early: set[str] = set()

    def process(self, records, seen=None):  # type: ignore[no-untyped-def]
        result = super().process(records, seen)
        for o in result.observations:
            if o.event_id in self.too_large:
                o.value = o.value + b" " * 1_200_000
            if o.event_id in self.too_early:
                o.occurred_at = datetime(1, 1, 1, tzinfo=timezone.utc)
        return result


@pytest.mark.integration
def test_an_observation_the_brokers_refuse_for_good_becomes_a_dead_letter_at_once(setup: Setup) -> None:
    events = [_lab(float(i)) for i in range(5)]
    normalizer = Refused(NormalizerSettings(), setup.topics)
    normalizer.too_large = {events[1]["event_id"]}
    normalizer.too_early = {events[3]["event_id"]}
    svc = setup.service(normalizer)
    started = time.monotonic()
    try:
        result = svc.handle([setup.feed.event(e) for e in events])
    finally:
        svc.close()
    assert time.monotonic() - started < 20  # no retrying of what can never be published
    good = {events[i]["event_id"] for i in (0, 2, 4)}
    assert {o.event_id for o in result.observations} == good
    assert sorted(r.headers["event-id"] for r in setup.read(setup.topics.observations)) == sorted(good)
    dead = _dead_letters(setup)
    assert sorted(dead) == [2, 4]
    assert dead[2]["stage"] == "size" and "bytes as JSON-LD" in dead[2]["reason"]
    assert dead[2]["event_id"] == events[1]["event_id"]
    assert dead[4]["stage"] == "publish" and dead[4]["issues"][0]["field"] == "occurred_at"
    assert svc.counters.undeliverable == 2 and svc.counters.by_stage == {"size": 1, "publish": 1}
    _accounted(svc.counters)
    assert not any(svc.store.contains_event(events[i]["event_id"]) for i in (1, 3))


@pytest.mark.integration
def test_a_record_with_a_key_of_1_5_mb_gives_one_dead_letter_and_the_batch_goes_out_once(setup: Setup) -> None:
    # Issue 14: its dead letter outgrew message.max.bytes, was retried forever, and every retry
    # sent the batch's observations again.
    svc = setup.service()
    events = [_lab(float(i)) for i in range(3)]
    huge = "K" * 1_500_000
    try:
        result = svc.handle([setup.feed.event(events[0]), setup.feed.record(b'{"event_id": 1}', key=huge,
                                                                             headers={"h": "v" * 300_000}),
                             *(setup.feed.event(e) for e in events[1:])])
    finally:
        svc.close()
    assert len(result.dead_letters) == 1 and len(result.observations) == 3
    (doc,) = _dead_letters(setup).values()
    assert doc["source"]["offset"] == 2 and doc["truncated"]
    assert {c["part"]: c["size"] for c in doc["cut"]}["source.key"] == 1_500_000
    assert sorted(r.headers["event-id"] for r in setup.read(setup.topics.observations)) == sorted(
        e["event_id"] for e in events)
    _accounted(svc.counters)


# -- duplicates ------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_reused_event_id_with_other_content_is_a_dead_letter_and_a_copy_a_duplicate(setup: Setup) -> None:
    svc = setup.service()
    first = _lab(6.8)
    raw = json.dumps(first).encode()
    try:
        svc.handle([setup.feed.event(first)])  # offset 1
        again = svc.handle([
            setup.feed.record(raw),  # 2: the same bytes (a redelivery)
            setup.feed.record(json.dumps(dict(reversed(list(first.items()))), indent=2).encode()),  # 3: laid out anew
            setup.feed.event({**first, "body": {**first["body"], "value": 7.1}}),  # 4: another value
            setup.feed.event({**first, "patient_id": "VP-0009"}),  # 5: another patient
        ])
        svc.drain()  # stored: the digest is now read from the marker in the store
        late = svc.handle([setup.feed.event({**first, "body": {**first["body"], "unit": "ug/L"}}), setup.feed.record(raw)])
    finally:
        svc.close()
    assert [r.offset for _, r in again.duplicates] == [2, 3] and [r.offset for _, r in late.duplicates] == [7]
    dead = _dead_letters(setup)
    assert sorted(dead) == [4, 5, 6]
    for offset in (4, 5, 6):
        doc = dead[offset]
        assert doc["stage"] == "duplicate" and doc["reason"] == "event_id already used with different content"
        assert doc["event_id"] == first["event_id"]
        messages = " ".join(i["message"] for i in doc["issues"])
        assert content_digest(raw) in messages
    assert [r.headers["event-id"] for r in setup.read(setup.topics.observations)] == [first["event_id"]]
    assert svc.counters.duplicates == 3 and svc.counters.conflicts == 3 and svc.counters.observations == 1
    _accounted(svc.counters)


@pytest.mark.integration
def test_an_event_marked_by_an_older_oncotwin_counts_as_a_duplicate_whatever_its_content(setup: Setup) -> None:
    old = _lab(1.0)
    setup.store.mark([old["event_id"]])  # a marker without a digest
    svc = setup.service()
    try:
        result = svc.handle([setup.feed.event({**old, "body": {**old["body"], "value": 2.0}})])
    finally:
        svc.close()
    assert len(result.duplicates) == 1 and not result.dead_letters and not result.observations
    _accounted(svc.counters)


class FailsFirstGraph(ShapeValidator):
    """Real shapes, but the first graph ever validated violates them (as a bad first copy would)."""

    def __init__(self) -> None:
        super().__init__("compiled")
        self.failed = False

    def validate_batch(self, graphs):  # type: ignore[no-untyped-def]
        verdicts = super().validate_batch(graphs)
        if graphs and not self.failed:
            self.failed = True
            verdicts[0] = [Violation(graphs[0].primary.iri or "", "fhir:code", "sh:MinCount", "simulated")]
        return verdicts


@pytest.mark.integration
def test_a_second_copy_is_judged_on_its_own_when_the_first_was_dead_lettered(setup: Setup) -> None:
    event = _lab(3.0)
    normalizer = Normalizer(NormalizerSettings(), setup.topics, shapes=FailsFirstGraph())
    svc = setup.service(normalizer)
    try:
        result = svc.handle([setup.feed.event(event), setup.feed.event({**event, "body": {**event["body"], "value": 3.5}})])
    finally:
        svc.close()
    assert [d.stage for d in result.dead_letters] == ["shacl"] and result.dead_letters[0].offset == 1
    assert [o.source.offset for o in result.observations] == [2] and not result.duplicates
    _accounted(svc.counters)


# -- logs ------------------------------------------------------------------------------------


@pytest.mark.integration
def test_log_lines_never_carry_an_identifier_or_a_value_of_a_record(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    name, value = "DOE^JOHN", "4242.4242"
    svc = setup.service()
    try:
        base = _lab(4242.4242)
        batch = [
            setup.feed.event({**_lab(), "patient_id": name}, key=name),  # a real name where a pseudonym belongs
            setup.feed.event({**base, "body": {**base["body"], "unit": "furlongs"}}, headers={"who": name}),
            setup.feed.event({**_lab(), "event_id": name}),
            setup.feed.record(b'{"patient_id": "DOE^JOHN", "value": 4242.4242', key=name),
            setup.feed.event({**_lab(), "occurred_at": "0001-01-01T00:00:00Z", "recorded_at": "0001-01-01T00:00:00Z"}),
        ]
        first = _lab(1.5)
        svc.handle([setup.feed.event(first)])
        result = svc.handle([*batch, setup.feed.event({**first, "patient_id": "VP-0003", "source": name})])
    finally:
        svc.close()
    assert len(result.dead_letters) == len(batch) + 1
    # The dead letters say it (the logs would, if they quoted reasons or keys) ...
    letters = b" ".join(r.value for r in setup.read(setup.topics.deadletter))
    assert name.encode() in letters
    # ... the log lines do not.
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = [formatter.format(record) for record in caplog.records]
    assert any("dead letter" in line for line in lines)
    for line in lines:
        assert name not in line and value not in line, line


# -- shutdown --------------------------------------------------------------------------------


def test_close_returns_within_its_bound_when_nothing_can_be_acknowledged(tmp_path: Path) -> None:
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1", topic_prefix="gone")  # no broker there
    topics = Topics.from_settings(kafka)
    svc = NormalizerService(kafka, Normalizer(NormalizerSettings(), topics), RdfStore(None), retry_pause_s=0.05)
    feed = Feed(topics)
    durable: list[bool] = []
    raised: list[BaseException] = []

    def work() -> None:
        try:
            svc.handle([feed.event(_lab(float(i))) for i in range(3)], lambda: durable.append(True))
        except BaseException as exc:  # noqa: BLE001  (what it raises is the test's subject)
            raised.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    time.sleep(1.0)  # publishing, and waiting for acknowledgements that never come
    started = time.monotonic()
    svc.close(timeout=10.0)
    thread.join(10)
    assert time.monotonic() - started < 10.0 and not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], Abandoned)
    assert durable == [] and svc.counters.abandoned == 1 and svc.counters.records == 0
    assert len(svc.store) == 0  # nothing stored or marked
    with pytest.raises(Abandoned):
        svc.handle([feed.event(_lab())])
