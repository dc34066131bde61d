"""No record can stall the normalizer (issue 14), on the real broker with the faust worker.

Hostile records from a generator of our own (random bytes, keys up to ~1 MB, odd and many
headers, empty values, valid-looking events with poison fields, conflicting and byte-identical
duplicates, records near the size limit) are mixed into a stream of valid events sent with a
plain librdkafka producer. Every valid event must come out on the observations topic exactly
once; every hostile record must give exactly one dead letter (found by its source topic,
partition and offset) or, for a byte-identical duplicate, nothing; all within a bounded time;
and the normalizer's counts must add up. Then the worker is stopped (SIGTERM, in a bounded
time), more hostile and valid records are sent, and a fresh worker must get through them: a
hostile record unacknowledged at the start does not stall it. Each run draws a new seed
(ONCOTWIN_TEST_SEED replays one); every assertion names it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Producer
from ingest_support import module_settings

from schemas import example
from stream import EmbeddedBroker, KafkaSettings, Topics, ensure_topics, read_all
from stream.agents import EXIT_SHUTDOWN_TIMEOUT
from stream.broker import free_port

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("ONCOTWIN_TEST_SEED") or random.SystemRandom().randrange(2**32))
MAX_RECORD_BYTES = 1_000_000  # the normalizer's default limit
PATIENTS = [f"VP-{i:04d}" for i in range(1, 7)]


@dataclass
class Sent:
    """One record sent, and what must become of it."""

    name: str
    expect: str  # "observation", "dead" or "duplicate"
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    event_id: str | None = None
    stage: str | None = None  # the dead letter's stage, where only one is right
    where: tuple[str, int, int] | None = None  # (topic, partition, offset) once acknowledged


class Normalizer:
    """``python -m stream.agents`` in a child process, on this module's topics."""

    def __init__(self, settings: KafkaSettings, data_dir: Path, log: Path) -> None:
        self.settings, self.data_dir, self.log = settings, data_dir, log
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(
            os.environ,
            KAFKA_BOOTSTRAP_SERVERS=self.settings.bootstrap_servers,
            ONCOTWIN_TOPIC_PREFIX=self.settings.topic_prefix,
            ONCOTWIN_CONSUMER_GROUP=self.settings.consumer_group,
            ONCOTWIN_TOPIC_PARTITIONS=str(self.settings.topic_partitions),
            ONCOTWIN_DATA_DIR=str(self.data_dir),
            ONCOTWIN_IMAGING_ROOT=str(self.data_dir),
            ONCOTWIN_NORMALIZER_WEB_PORT=str(self.port),
            ONCOTWIN_MAX_RECORD_BYTES=str(MAX_RECORD_BYTES),
            ONCOTWIN_NORMALIZER_STORE_WITHIN_S="0.2",
            ONCOTWIN_LOG_LEVEL="WARNING",
        )
        self.process = subprocess.Popen([sys.executable, "-m", "stream.agents"], env=env,
                                        stdout=self.log.open("a"), stderr=subprocess.STDOUT)

    def alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"[seed {SEED}] the normalizer exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/normalizer/stats", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> tuple[float, int]:
        """SIGTERM; (the seconds it took to exit, its exit status)."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"[seed {SEED}] SIGTERM did not stop the normalizer within 30 s")
        finally:
            self.process = None
        return time.monotonic() - started, code


# -- the generator -------------------------------------------------------------------------------


def _event(rng: random.Random, kind: str) -> dict:
    event = example(kind)
    event["event_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    event["patient_id"] = rng.choice(PATIENTS)
    if kind == "lab":
        event["body"]["value"] = round(rng.uniform(0.1, 500.0), 3)
    return event


def valid(rng: random.Random, topics: Topics, n: int) -> list[Sent]:
    out = []
    for i in range(n):
        kind = rng.choice(["lab", "lab", "ctdna", "treatment"])
        event = _event(rng, kind)
        value = json.dumps(event).encode()
        if i == 0:
            value += b" " * (MAX_RECORD_BYTES - len(value) - 10)  # near the limit, and valid
        out.append(Sent(f"valid {kind}", "observation", topics.event_topic(kind), event["patient_id"].encode(), value,
                        [("content-type", b"application/json")], event["event_id"]))
    return out


def _poison(rng: random.Random, topics: Topics) -> Sent:
    """A valid-looking event with one poison field: the contract or the publishing refuses it."""
    kind = rng.choice(["lab", "treatment"])
    event = _event(rng, kind)
    name, change = rng.choice([
        ("occurred_at 0001", lambda e: e.update(occurred_at="0001-01-01T00:00:00Z", recorded_at="0001-01-01T00:00:00Z")),
        ("occurred_at 1969", lambda e: e.update(occurred_at="1969-12-31T23:59:59Z", recorded_at="1969-12-31T23:59:59Z")),
        ("occurred_at 9999", lambda e: e.update(occurred_at="9999-12-31T23:59:59Z")),
        ("a name for a pseudonym", lambda e: e.update(patient_id="DOE^JOHN")),
        ("event_id not a UUID", lambda e: e.update(event_id="x" * rng.randint(1, 300))),
        ("no body", lambda e: e.pop("body")),
        ("kind of another topic", lambda e: e.update(kind="ctdna" if e["kind"] == "lab" else "lab")),
        ("a number of 2^64", lambda e: e["body"].update(value=2**64) if e["kind"] == "lab"
         else e["body"].update(fractions_planned=2**64)),
        ("an unknown unit", lambda e: e["body"].update(unit="furlongs") if e["kind"] == "lab"
         else e["body"]["dose"].update(unit="furlongs")),
    ])
    change(event)
    value = json.dumps(event).encode()
    return Sent(f"poison: {name}", "dead", topics.event_topic(kind), str(event.get("patient_id"))[:64].encode(), value,
                event_id=None)


def hostile(rng: random.Random, topics: Topics, n: int) -> list[Sent]:
    event_topics = list(topics.events())
    out: list[Sent] = []
    for _ in range(n):
        topic = rng.choice(event_topics)
        pick = rng.randrange(9)
        if pick == 0:
            out.append(Sent("random bytes", "dead", topic, rng.randbytes(rng.randint(1, 40)), rng.randbytes(rng.randint(1, 3000))))
        elif pick == 1:
            out.append(Sent("empty value", "dead", topic, b"VP-0001", rng.choice([b"", None]), stage="size"))
        elif pick == 2:
            key = rng.randbytes(rng.randint(100_000, 1_000_000))
            out.append(Sent("a key of up to 1 MB", "dead", topic, key, b'{"event_id": 1}'))
        elif pick == 3:
            headers = [(f"h{i}\x00\u00e9", rng.randbytes(rng.randint(0, 2000))) for i in range(rng.randint(40, 600))]
            out.append(Sent("many odd headers", "dead", topic, b"VP-0002", rng.randbytes(50), headers))
        elif pick == 4:
            out.append(Sent("a header of 200 kB", "dead", topic, b"VP-0002", b"[]", [("x", b"\xff" * 200_000)]))
        elif pick == 5:
            size = rng.choice([MAX_RECORD_BYTES - 100, MAX_RECORD_BYTES + 1, 1_900_000])
            value = b'{"patient_id": "' + b"A" * (size - 19) + b'"}'
            out.append(Sent("near the size limit", "dead", topic, b"VP-0003", value))
        elif pick == 6:
            out.append(Sent("deep nesting", "dead", topic, b"VP-0001", b"[" * 50_000 + b"]" * 50_000))
        elif pick == 7:
            out.append(Sent("a lone surrogate", "dead", topic, b"VP-0001",
                            b'{"event_id": "\\ud800", "patient_id": "VP-0001"}', stage="parse"))
        else:
            out.append(_poison(rng, topics))
    return out


def duplicates(rng: random.Random, originals: list[Sent]) -> list[Sent]:
    """Byte-identical copies of some originals, and others' event ids reused with other content."""
    out = []
    for original in rng.sample(originals, k=min(len(originals), 8)):
        out.append(Sent("byte-identical duplicate", "duplicate", original.topic, original.key, original.value,
                        original.headers, original.event_id))
    for original in rng.sample(originals, k=min(len(originals), 6)):
        event = json.loads(original.value)
        if rng.random() < 0.5:
            event["patient_id"] = next(p for p in PATIENTS if p != event["patient_id"])
        else:
            event["recorded_at"] = event["occurred_at"]
            event["source"] = "a corrected feed"
        out.append(Sent("event_id reused with other content", "dead", original.topic, event["patient_id"].encode(),
                        json.dumps(event).encode(), stage="duplicate"))
    return out


# -- sending and checking ------------------------------------------------------------------------


def send(settings: KafkaSettings, records: list[Sent]) -> None:
    # A plain librdkafka producer that sends what a foreign feed may send, up to tansu's limits.
    producer = Producer({"bootstrap.servers": settings.bootstrap_servers, "message.max.bytes": 3_000_000,
                         "enable.idempotence": True, "linger.ms": 5})
    errors = []

    def done(record: Sent):  # type: ignore[no-untyped-def]
        def report(error, message):  # type: ignore[no-untyped-def]
            if error is not None:
                errors.append(error)
            else:
                record.where = (message.topic(), message.partition(), message.offset())
        return report

    for record in records:
        producer.produce(record.topic, key=record.key, value=record.value, headers=record.headers, on_delivery=done(record))
        producer.poll(0)
    assert producer.flush(60) == 0 and not errors, errors


def dead_letters(settings: KafkaSettings, topics: Topics) -> Counter:
    out: Counter = Counter()
    for r in read_all(settings, topics.deadletter, timeout=20, idle_timeout=1.0):
        doc = json.loads(r.value)
        source = doc["source"]
        out[(source["topic"], source["partition"], source["offset"])] += 1
        out[("stage", source["topic"], source["partition"], source["offset"], doc["stage"])] += 1
    return out


def observations(settings: KafkaSettings, topics: Topics) -> Counter:
    return Counter(r.headers.get("event-id") for r in read_all(settings, topics.observations, timeout=20, idle_timeout=1.0))


def settle(normalizer: Normalizer, settings: KafkaSettings, topics: Topics, sent: list[Sent], timeout: float) -> tuple[Counter, Counter]:
    """Wait until every record sent has its outcome (or ``timeout``); returns what came out."""
    expected_dead = [s.where for s in sent if s.expect == "dead"]
    expected_ids = {s.event_id for s in sent if s.expect == "observation"}
    deadline = time.monotonic() + timeout
    while True:
        normalizer.alive()
        out, dead = observations(settings, topics), dead_letters(settings, topics)
        if (expected_ids <= set(out) and all(dead[w] for w in expected_dead)) or time.monotonic() > deadline:
            return out, dead
        time.sleep(0.5)


def check(sent: list[Sent], out: Counter, dead: Counter, what: str) -> None:
    for s in sent:
        where = f"[seed {SEED}] {what}: {s.name} at {s.where}"
        if s.expect == "observation":
            assert out[s.event_id] == 1, f"{where}: {out[s.event_id]} observations"
            assert dead[s.where] == 0, f"{where}: dead-lettered"
        elif s.expect == "dead":
            assert dead[s.where] == 1, f"{where}: {dead[s.where]} dead letters"
            if s.stage is not None:
                assert dead[("stage", *s.where, s.stage)] == 1, f"{where}: not stage {s.stage}"
        else:
            assert dead[s.where] == 0, f"{where}: a byte-identical duplicate was dead-lettered"
    hostile_ids = {json.loads(s.value).get("event_id") for s in sent
                   if s.expect == "dead" and s.value and s.value.startswith(b"{") and len(s.value) < MAX_RECORD_BYTES
                   and _json_object(s.value)}
    valid_ids = {s.event_id for s in sent if s.expect == "observation"}
    assert not (hostile_ids - valid_ids) & set(out), f"[seed {SEED}] {what}: a hostile record became an observation"


def _json_object(value: bytes) -> bool:
    try:
        return isinstance(json.loads(value), dict)
    except (ValueError, RecursionError):
        return False


@pytest.fixture(scope="module")
def running(local_kafka: KafkaSettings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Normalizer, KafkaSettings, Topics]]:
    settings = module_settings(local_kafka, partitions=3)
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    base = tmp_path_factory.mktemp("isolation")
    normalizer = Normalizer(settings, base / "data", base / "normalizer.log")
    normalizer.start()
    yield normalizer, settings, topics
    if normalizer.process is not None:
        normalizer.process.kill()
        normalizer.process.wait()


def test_no_record_stalls_the_normalizer_and_each_has_one_outcome(running) -> None:  # type: ignore[no-untyped-def]
    normalizer, settings, topics = running
    rng = random.Random(SEED)

    # 1. Valid events with hostile records among them.
    first_valid = valid(rng, topics, 30)
    first = first_valid + hostile(rng, topics, 30)
    rng.shuffle(first)
    started = time.monotonic()
    send(settings, first)
    out, dead = settle(normalizer, settings, topics, first, timeout=60)
    check(first, out, dead, "running")
    assert time.monotonic() - started < 60, f"[seed {SEED}] not settled within 60 s"

    # 2. Duplicates of those events (their originals are published by now), with more of both.
    second = duplicates(rng, first_valid) + valid(rng, topics, 10) + hostile(rng, topics, 10)
    rng.shuffle(second)
    send(settings, second)
    out, dead = settle(normalizer, settings, topics, first + second, timeout=45)
    check(first + second, out, dead, "duplicates")
    sent = first + second
    deadline = time.monotonic() + 10
    while (stats := normalizer.stats())["records"] < len(sent) and time.monotonic() < deadline:
        time.sleep(0.2)  # the counts follow the publishing by moments
    assert stats["records"] == len(sent), stats
    assert stats["records"] == stats["observations"] + stats["dead_letters"] + stats["duplicates"], stats
    assert stats["duplicates"] == sum(s.expect == "duplicate" for s in sent), stats
    assert stats["dead_letters"] == sum(s.expect == "dead" for s in sent), stats
    assert stats["conflicts"] == sum(s.stage == "duplicate" for s in sent), stats

    # 3. Stopped (bounded), then hostile records unacknowledged when a fresh worker starts.
    took, code = normalizer.stop()
    assert code == 0 and took < 10, (took, code, normalizer.log.read_text()[-3000:])
    third = hostile(rng, topics, 12) + valid(rng, topics, 10)
    rng.shuffle(third)
    send(settings, third)
    normalizer.start()
    out, dead = settle(normalizer, settings, topics, sent + third, timeout=60)
    check(sent + third, out, dead, "after the restart")


def test_sigterm_ends_the_normalizer_within_10_s_when_the_broker_stops_answering(tmp_path: Path) -> None:
    # A broker of its own, frozen (SIGSTOP) while records are on their way: nothing is
    # acknowledged, committed or answered any more, and faust's own shutdown would wait forever.
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        settings = module_settings(KafkaSettings.from_env({}).with_bootstrap(broker.bootstrap_servers), partitions=1)
        topics = Topics.from_settings(settings)
        ensure_topics(settings, topics)
        normalizer = Normalizer(settings, tmp_path / "data", tmp_path / "normalizer.log")
        normalizer.start()
        rng = random.Random(SEED)
        warm = valid(rng, topics, 3)[1:]
        send(settings, warm)
        out, _ = settle(normalizer, settings, topics, warm, timeout=60)
        assert {s.event_id for s in warm} <= set(out), normalizer.log.read_text()[-3000:]
        send(settings, valid(rng, topics, 20)[1:])
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            took, code = normalizer.stop()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
    assert took < 10 and code in (0, EXIT_SHUTDOWN_TIMEOUT), (took, code)
