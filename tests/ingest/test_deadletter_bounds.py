"""A dead letter always fits in a Kafka record, whatever the record it stands for held: huge
keys, headers, values, reasons and issues are cut to their budgets, each cut part keeps its size
and SHA-256, and every part not cut reads back exactly. The producer tells a record's own
refusal (too large, a timestamp Kafka cannot carry) from the cluster's failures."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ingest_support import module_settings

from stream import KafkaSettings, Topics, ensure_topics, read_all
from stream.deadletter import (
    MAX_DEADLETTER_BYTES,
    MAX_HEADER_VALUE_BYTES,
    MAX_HEADERS,
    MAX_ISSUE_FIELD_BYTES,
    MAX_ISSUE_MESSAGE_BYTES,
    MAX_ISSUES,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_REASON_BYTES,
    DeadLetter,
    Issue,
    original_bytes,
)
from stream.producer import DeliveryError, EventProducer, Outgoing

# librdkafka's message.max.bytes, which KafkaSettings.producer_config leaves as it is.
PRODUCER_LIMIT = 1_000_000

# Any code point, lone surrogates and control characters included (the costliest to escape).
CHARS = st.characters(codec=None, exclude_categories=())


def _long(max_repeat: int) -> st.SearchStrategy[str]:
    """Texts from empty to millions of characters: a random piece repeated."""
    return st.builds(lambda piece, n: piece * n, st.text(CHARS, min_size=1, max_size=8), st.integers(0, max_repeat))


@st.composite
def dead_letters(draw: st.DrawFn) -> DeadLetter:
    n_headers = draw(st.sampled_from([0, 1, MAX_HEADERS, MAX_HEADERS + 1, 700]))
    name, value = draw(_long(300)), draw(_long(3000))
    headers = {f"{name}{i}": value for i in range(n_headers)}
    n_issues = draw(st.sampled_from([0, 1, MAX_ISSUES, 300]))
    issue = Issue(draw(_long(400)), draw(_long(2000)))
    original = draw(st.one_of(st.none(), st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=4), st.integers(0, 700_000))))
    return DeadLetter(
        stage=draw(st.sampled_from(["parse", "size", "duplicate", "x" * 1000])),
        reason=draw(_long(20_000)),
        topic=draw(st.sampled_from(["oncotwin.events.lab.v1", "t" * 249])),
        partition=draw(st.integers(0, 2**31 - 1)),
        offset=draw(st.integers(0, 2**63 - 1)),
        key=draw(st.one_of(st.none(), _long(400_000))),
        original=original,
        issues=(issue,) * n_issues,
        timestamp_ms=draw(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
        headers=headers,
        event_id=draw(st.one_of(st.none(), _long(500))),
        kind=draw(st.one_of(st.none(), _long(100))),
        bare=draw(st.booleans()),
    )


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _digest(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _whole_json(value: object) -> bytes:
    return _utf8(json.dumps(value, separators=(",", ":"), ensure_ascii=False))  # a second way to the same bytes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(dead_letters())
def test_a_dead_letter_always_fits_and_what_is_not_cut_reads_back_exactly(dead: DeadLetter) -> None:
    data = dead.to_bytes()
    assert len(data) <= MAX_DEADLETTER_BYTES
    key = dead.record_key()
    record = len(data) + len(_utf8(key or "")) + sum(len(_utf8(n)) + len(_utf8(v)) for n, v in dead.record_headers().items())
    assert record < PRODUCER_LIMIT - 10_000  # room for Kafka's own framing
    doc = json.loads(data)
    cut = {c["part"]: c for c in doc["cut"]}
    assert doc["truncated"] == bool(cut)

    def text_part(part: str, got: str | None, whole: str | None, limit: int) -> None:
        if whole is None:
            assert got is None and part not in cut
        elif part in cut:
            assert whole.startswith(got) and len(got) < len(whole)
            assert len(json.dumps(got, ensure_ascii=False).encode("utf-8", "backslashreplace")) - 2 <= limit
            assert {k: cut[part][k] for k in ("size", "sha256")} == _digest(_utf8(whole))
        else:
            assert got == whole

    text_part("reason", doc["reason"], dead.reason, MAX_REASON_BYTES)
    text_part("stage", doc["stage"], dead.stage, MAX_NAME_BYTES)
    text_part("event_id", doc["event_id"], dead.event_id, MAX_NAME_BYTES)
    text_part("kind", doc["kind"], dead.kind, MAX_NAME_BYTES)
    text_part("source.topic", doc["source"]["topic"], dead.topic, MAX_NAME_BYTES)
    text_part("source.key", doc["source"]["key"], dead.key, MAX_KEY_BYTES)
    assert key == doc["source"]["key"]  # the record's key is the key as the dead letter keeps it
    assert (doc["source"]["partition"], doc["source"]["offset"], doc["source"]["timestamp_ms"]) == (
        dead.partition, dead.offset, dead.timestamp_ms)

    headers, issues = doc["source"]["headers"], doc["issues"]
    if "source.headers" in cut:
        assert cut["source.headers"]["count"] == len(dead.headers) and cut["source.headers"]["kept"] == len(headers)
        assert len(headers) <= (0 if dead.bare else MAX_HEADERS)
        assert all(len(_utf8(v)) <= MAX_HEADER_VALUE_BYTES for v in headers.values())
        assert {k: cut["source.headers"][k] for k in ("size", "sha256")} == _digest(_whole_json(dict(dead.headers)))
    else:
        assert headers == dict(dead.headers)
    whole_issues = [{"field": i.field, "message": i.message} for i in dead.issues]
    if "issues" in cut:
        assert cut["issues"]["count"] == len(whole_issues) and len(issues) <= (0 if dead.bare else MAX_ISSUES)
        assert all(len(_utf8(i["field"])) <= MAX_ISSUE_FIELD_BYTES and len(_utf8(i["message"])) <= MAX_ISSUE_MESSAGE_BYTES
                   for i in issues)
        assert {k: cut["issues"][k] for k in ("size", "sha256")} == _digest(_whole_json(whole_issues))
    else:
        assert issues == whole_issues

    original = dead.original
    assert doc["original_size"] == len(original or b"")
    assert doc["original_sha256"] == hashlib.sha256(original or b"").hexdigest()
    if original is None or dead.bare:
        assert original_bytes(doc) is None
    elif "original" in cut:
        assert doc["original_truncated"] and original.startswith(original_bytes(doc))
        assert {k: cut["original"][k] for k in ("size", "sha256")} == _digest(original)
    else:
        assert original_bytes(doc) == original and not doc["original_truncated"]


def test_the_costliest_dead_letter_stays_within_the_bound() -> None:
    # Every part over its budget in the character that costs most in JSON (\u0001: 6 bytes).
    worst = "\x01" * 2_000_000
    dead = DeadLetter(
        stage=worst, reason=worst, topic=worst, partition=2**31 - 1, offset=2**63 - 1, key=worst,
        original=b"\xff" * 2_000_000, issues=(Issue(worst[:5000], worst[:5000]),) * 1000, timestamp_ms=2**63 - 1,
        headers={f"{i:04d}{worst[:500]}": worst[:5000] for i in range(1000)}, event_id=worst, kind=worst,
    )
    data = dead.to_bytes()
    assert len(data) <= MAX_DEADLETTER_BYTES
    doc = json.loads(data)
    assert doc["truncated"] and {c["part"] for c in doc["cut"]} == {
        "original", "source.headers", "issues", "stage", "reason", "event_id", "kind", "source.topic", "source.key"}
    assert len(doc["source"]["headers"]) == MAX_HEADERS and len(doc["issues"]) == MAX_ISSUES
    assert len(base64.b64decode(doc["original_base64"])) == 512 * 1024


def test_a_bare_dead_letter_keeps_the_coordinates_and_publishes_at_the_time_of_publishing() -> None:
    dead = DeadLetter("parse", "not JSON", "oncotwin.events.lab.v1", 2, 41, "VP-0001", b"{" * 100,
                      issues=(Issue("$", "unexpected end"),), timestamp_ms=-5, headers={"a": "b"})
    assert dead.record_timestamp_ms is None  # Kafka cannot carry a negative timestamp
    assert replace(dead, timestamp_ms=1700000000000).record_timestamp_ms == 1700000000000
    bare = replace(dead, timestamp_ms=1700000000000).as_bare("could not be published whole")
    assert bare.record_timestamp_ms is None
    doc = json.loads(bare.to_bytes())
    assert doc["reason"] == "could not be published whole; not JSON"
    assert original_bytes(doc) is None and doc["original_size"] == 100
    assert doc["issues"] == [] and doc["source"]["headers"] == {}
    assert (doc["source"]["topic"], doc["source"]["partition"], doc["source"]["offset"]) == ("oncotwin.events.lab.v1", 2, 41)
    assert {c["part"] for c in doc["cut"]} == {"original", "source.headers", "issues"}


def test_log_context_names_the_record_and_the_field_paths_never_values() -> None:
    dead = DeadLetter("schema", "patient_id 'DOE^JOHN' does not match '^[A-Za-z0-9-]+$'", "t", 1, 9, "DOE^JOHN",
                      b'{"patient_id": "DOE^JOHN"}', issues=(Issue("patient_id", "'DOE^JOHN' does not match"),
                      Issue("https://w3id.org/oncotwin/fhir/Patient/DOE^JOHN http://hl7.org/fhir/subject", "x")),
                      headers={"who": "DOE^JOHN"}, event_id="DOE^JOHN")
    line = dead.log_context()
    assert "DOE" not in line
    assert line == "t[1]@9 stage=schema event=- fields=http://hl7.org/fhir/subject,patient_id"
    ok = replace(dead, event_id="3f1c2a9e-0000-4000-8000-000000000001")
    assert "event=3f1c2a9e-0000-4000-8000-000000000001" in ok.log_context()


# -- the producer --------------------------------------------------------------------------


def test_delivery_to_no_broker_fails_as_not_permanent_and_a_stop_ends_the_wait() -> None:
    dead_port = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    producer = EventProducer(dead_port)
    try:
        records = [Outgoing("t", "VP-SECRET", b"v", 1700000000000), Outgoing("t", "VP-SECRET", b"v", timestamp_ms=-1),
                   Outgoing("t", "VP-SECRET", b"v" * 2_000_000)]
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        outcomes = producer.deliver(records, timeout=60, stop=stop, grace_s=0.5)
        assert time.monotonic() - started < 5
        waiting, timestamp, size = outcomes
        assert waiting is not None and not waiting.permanent and "shutdown" in waiting.error
        assert timestamp is not None and timestamp.permanent and timestamp.code == 32  # INVALID_TIMESTAMP
        assert size is not None and size.permanent and size.code == 10  # MSG_SIZE_TOO_LARGE
        # A key is a pseudonym: never in the message of an error, which goes to logs.
        assert "VP-SECRET" not in str(DeliveryError(outcomes))
    finally:
        producer.close(0.1)  # deliver's records never make close raise: their outcome was told


@pytest.mark.integration
def test_the_costliest_dead_letter_is_accepted_by_the_broker(local_kafka: KafkaSettings) -> None:
    kafka = module_settings(local_kafka, partitions=1)
    topics = Topics.from_settings(kafka)
    ensure_topics(kafka, topics, partitions=1)
    worst = "\x01" * 2_000_000
    dead = DeadLetter("parse", worst, topics.lab, 0, 3, worst, b"\xff" * 1_500_000, issues=(Issue(worst, worst),) * 100,
                      timestamp_ms=1700000000000, headers={f"h{i}": worst[:3000] for i in range(500)}, event_id=worst)
    with EventProducer(kafka) as producer:
        (outcome,) = producer.deliver([Outgoing(topics.deadletter, dead.record_key(), dead.to_bytes(),
                                                dead.record_timestamp_ms, dead.record_headers())], timeout=30)
    assert outcome is None
    (record,) = read_all(kafka, topics.deadletter, timeout=20, idle_timeout=1.0)
    assert json.loads(record.value)["source"]["offset"] == 3
