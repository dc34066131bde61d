"""The normalizer worker end to end on a real broker: one faust worker for the whole module.

Events of every kind reach the observations topic and the RDF store (SPARQL finds them); bad
records reach the dead-letter topic with their stage, reason and original bytes, and the worker
keeps going; records compressed with any of Kafka's codecs are read; duplicates give one
observation, also across a restart.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from ingest_support import dicom_file, local_dicom_testdata, module_settings

from schemas import example, parse_time
from stream import EventProducer, KafkaSettings, Record, Topics, ensure_topics, read_all, timestamp_ms
from stream.broker import free_port
from stream.decode import decode_jsonld
from stream.volumes import claim_check

pytestmark = pytest.mark.integration

MAX_BYTES = 20_000


@dataclass
class Worker:
    settings: KafkaSettings
    topics: Topics
    root: Path
    data_dir: Path
    port: int
    log: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(
            os.environ,
            KAFKA_BOOTSTRAP_SERVERS=self.settings.bootstrap_servers,
            ONCOTWIN_TOPIC_PREFIX=self.settings.topic_prefix,
            ONCOTWIN_CONSUMER_GROUP=self.settings.consumer_group,
            ONCOTWIN_TOPIC_PARTITIONS=str(self.settings.topic_partitions),
            ONCOTWIN_IMAGING_ROOT=str(self.root),
            ONCOTWIN_DATA_DIR=str(self.data_dir),
            ONCOTWIN_NORMALIZER_WEB_PORT=str(self.port),
            ONCOTWIN_MAX_RECORD_BYTES=str(MAX_BYTES),
            ONCOTWIN_LOG_LEVEL="WARNING",
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stream.agents"], env=env, stdout=self.log.open("a"), stderr=subprocess.STDOUT
        )

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None
        finally:
            self.process = None

    def alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"the normalizer worker exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")

    def sparql(self, query: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/sparql?{urllib.parse.urlencode({'query': query})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())


def send(settings: KafkaSettings, records: list[tuple[str, str | None, bytes]]) -> None:
    with EventProducer(settings) as producer:
        for topic, key, value in records:
            producer.send(topic, key, value)


def event_record(topics: Topics, event: dict) -> tuple[str, str, bytes]:
    return topics.event_topic(event["kind"]), event["patient_id"], json.dumps(event).encode()


def wait_for(worker: Worker, topic: str, done: Callable[[list[Record]], bool], timeout: float = 40) -> list[Record]:
    deadline = time.monotonic() + timeout
    while True:
        worker.alive()
        records = read_all(worker.settings, topic, timeout=10, idle_timeout=0.5)
        if done(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.3)


def ids_of(records: list[Record]) -> list[str]:
    return [r.headers.get("event-id", "") for r in records]


def new_lab(value: float = 5.0) -> dict:
    event = example("lab")
    event["event_id"] = str(uuid.uuid4())
    event["body"]["value"] = value
    return event


@pytest.fixture(scope="module")
def worker(local_kafka: KafkaSettings, cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    settings = module_settings(local_kafka)
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    base = tmp_path_factory.mktemp("normalizer")
    root = base / "imaging"
    shutil.copytree(cohort, root, ignore=shutil.ignore_patterns("*.safetensors", "truth.json"))
    w = Worker(settings, topics, root, base / "data", free_port(), base / "worker.log")
    w.start()
    warmup = new_lab()
    send(settings, [event_record(topics, warmup)])
    found = wait_for(w, topics.observations, lambda rs: warmup["event_id"] in ids_of(rs), timeout=60)
    assert warmup["event_id"] in ids_of(found), w.log.read_text()[-3000:]
    yield w
    w.stop()


def test_every_kind_reaches_the_observations_topic_and_the_store(worker: Worker, cohort_events: list[dict]) -> None:
    topics = worker.topics
    events = cohort_events[:]
    mr = dicom_file("MR_small.dcm")
    shutil.copy(mr, worker.root / "mr.dcm")
    scan = example("imaging")
    scan["event_id"] = str(uuid.uuid4())
    import pydicom

    header = pydicom.dcmread(worker.root / "mr.dcm", stop_before_pixels=True)
    scan["body"].pop("segmentation_uri")
    scan["body"]["measures"] = {}
    scan["body"].update(
        study_uid=str(header.StudyInstanceUID), series_uid=str(header.SeriesInstanceUID),
        dicom_uri=claim_check(worker.root / "mr.dcm", worker.root, format="dicom"),
    )
    scan["occurred_at"] = scan["recorded_at"] = "2004-08-26T10:00:00Z"
    events.append(scan)
    send(worker.settings, [event_record(topics, e) for e in events])
    wanted = {e["event_id"] for e in events}
    records = wait_for(worker, topics.observations, lambda rs: wanted <= set(ids_of(rs)))
    by_id = {r.headers["event-id"]: r for r in records}
    assert wanted <= set(by_id), "missing: " + str(wanted - set(by_id))
    for event in events:
        record = by_id[event["event_id"]]
        assert record.key == event["patient_id"]
        assert record.headers["content-type"] == "application/ld+json"
        # The observation's header carries the event's schema version as the feed sent it.
        assert record.headers["kind"] == event["kind"] and record.headers["schema-version"] == event["schema_version"]
        assert record.timestamp_ms == timestamp_ms(parse_time(event["occurred_at"]))
        decoded = decode_jsonld(record.value)
        assert decoded.event_id == event["event_id"] and decoded.kind == event["kind"]
    assert {e["kind"] for e in events} == {"imaging", "lab", "ctdna", "treatment"}
    # Every event's resources are in the store, named by the event; SPARQL finds each kind.
    answer = worker.sparql(
        "SELECT ?kind (COUNT(DISTINCT ?r) AS ?n) WHERE { ?r prov:wasDerivedFrom ?e ; ot:eventKind ?kind } GROUP BY ?kind"
    )
    counts = {b["kind"]["value"]: int(b["n"]["value"]) for b in answer["results"]["bindings"]}
    assert set(counts) == {"imaging", "lab", "ctdna", "treatment"}
    for event in events:
        source = f"urn:uuid:{event['event_id']}"
        ask = worker.sparql(f"ASK {{ ?r prov:wasDerivedFrom <{source}> ; fhir:subject ?p }}")
        assert ask["boolean"] is True, event["kind"]
    psa = worker.sparql(
        "SELECT ?v WHERE { ?o fhir:code loinc:2857-1 ; fhir:valueQuantity [ fhir:value ?v ; fhir:code 'ng/mL' ] }"
    )
    assert psa["results"]["bindings"]


def _bad_records(worker: Worker, tmp: Path) -> list[tuple[str, str, tuple[str, str | None, bytes]]]:
    """(name, expected stage, record) for every kind of bad input."""
    topics, root = worker.topics, worker.root
    out: list[tuple[str, str, tuple[str, str | None, bytes]]] = []
    out.append(("malformed JSON", "parse", (topics.lab, "VP-0001", b'{"event_id": "' + uuid.uuid4().hex.encode())))

    def bad(name: str, stage: str, change: Callable[[dict], None], kind: str = "lab") -> None:
        event = example(kind)
        event["event_id"] = str(uuid.uuid4())
        change(event)
        out.append((name, stage, (topics.event_topic(kind), event["patient_id"], json.dumps(event).encode())))

    bad("schema violation", "schema", lambda e: e["body"].pop("value"))
    bad("unknown code", "code", lambda e: e["body"].update(code="99999-9"))
    bad("unknown unit", "unit", lambda e: e["body"].update(unit="furlongs"))
    bad("NaN value", "schema", lambda e: e["body"].update(value=float("nan")))
    bad("negative value", "schema", lambda e: e["body"].update(value=-4.0))
    bad("oversize", "size", lambda e: e["body"].update(method="m" * (MAX_BYTES + 10)))
    bad("far future", "time", lambda e: e.update(occurred_at="2099-01-01T00:00:00Z"))

    seg = next(root.glob("*/mri-*-seg.nii.gz"))
    outside = tmp / "outside.nii.gz"
    shutil.copy(seg, outside)
    link = seg.parent / f"escape-{uuid.uuid4().hex[:6]}.nii.gz"
    link.symlink_to(outside)

    def scan(name: str, stage: str, claim: dict, **body: object) -> None:
        def change(e: dict) -> None:
            e["body"].pop("dicom_uri", None)
            e["body"]["segmentation_uri"] = claim
            e["body"]["measures"] = {}
            e["body"]["voxel_spacing_mm"] = [5.0, 5.0, 5.0]
            e["body"].update(body)

        bad(name, stage, change, kind="imaging")

    good_claim = claim_check(seg, root, format="nifti", content="segmentation")
    scan("claim check with ..", "schema", {**good_claim, "uri": "a/../../etc/passwd"})
    scan("absolute path", "schema", {**good_claim, "uri": "/etc/passwd"})
    scan("file URI outside the root", "claim-check", {**good_claim, "uri": outside.as_uri()})
    scan("symlink escaping the root", "claim-check", {**good_claim, "uri": link.relative_to(root).as_posix()})
    scan("URL without DICOMweb", "claim-check", {**good_claim, "uri": "https://pacs.example.org/wado/x"})
    no_meta = local_dicom_testdata("no_meta.dcm")
    if no_meta:
        shutil.copy(no_meta[0], root / "no_meta.dcm")

        def broken(e: dict) -> None:
            e["body"].pop("segmentation_uri")
            e["body"]["measures"] = {}
            e["body"]["dicom_uri"] = claim_check(root / "no_meta.dcm", root, format="dicom")

        bad("broken DICOM", "dicom", broken, kind="imaging")
    shutil.copy(dicom_file("MR_small.dcm"), root / "mr-other.dcm")

    def mismatch(e: dict) -> None:
        e["body"].pop("segmentation_uri")
        e["body"]["measures"] = {}
        e["body"]["dicom_uri"] = claim_check(root / "mr-other.dcm", root, format="dicom")
        e["occurred_at"] = e["recorded_at"] = "2004-08-26T10:00:00Z"

    bad("mismatched study UID", "dicom", mismatch, kind="imaging")
    event = example("lab")
    event["event_id"] = str(uuid.uuid4())
    out.append(("wrong topic", "routing", (topics.ctdna, event["patient_id"], json.dumps(event).encode())))
    return out


def test_bad_records_are_dead_lettered_and_the_worker_goes_on(worker: Worker, tmp_path: Path) -> None:
    bad = _bad_records(worker, tmp_path)
    good = new_lab(7.5)
    send(worker.settings, [record for _, _, record in bad] + [event_record(worker.topics, good)])
    observations = wait_for(worker, worker.topics.observations, lambda rs: good["event_id"] in ids_of(rs))
    assert good["event_id"] in ids_of(observations)
    originals = {record[2]: (name, stage) for name, stage, record in bad}
    letters = wait_for(
        worker, worker.topics.deadletter,
        lambda rs: len({base64.b64decode(json.loads(r.value)["original_base64"]) for r in rs} & set(originals)) == len(originals),
    )
    seen: dict[str, dict] = {}
    for record in letters:
        document = json.loads(record.value)
        original = base64.b64decode(document["original_base64"])
        if original in originals:
            seen[originals[original][0]] = document
    assert set(seen) == {name for name, _, _ in bad}
    for name, stage, (topic, _key, _value) in bad:
        document = seen[name]
        assert document["stage"] == stage, (name, document["reason"])
        assert document["reason"], name
        assert document["source"]["topic"] == topic and document["source"]["offset"] >= 0
    # None of them became an observation.
    bad_ids = set()
    for _, _, (_, _, value) in bad:
        try:
            bad_ids.add(json.loads(value).get("event_id"))
        except ValueError:
            pass
    assert not bad_ids & set(ids_of(observations))


def test_records_compressed_with_every_kafka_codec_are_normalized(worker: Worker) -> None:
    # Feeds choose their own codec; faust's consumer (aiokafka) decodes lz4, snappy and zstd
    # only with cramjam installed, and without it the worker crashed on the first such batch.
    sent = {}
    for codec in ("none", "gzip", "snappy", "lz4", "zstd"):
        event = new_lab()
        sent[codec] = event["event_id"]
        send(replace(worker.settings, compression_type=codec), [event_record(worker.topics, event)])
    observations = wait_for(worker, worker.topics.observations, lambda rs: set(sent.values()) <= set(ids_of(rs)))
    assert {codec for codec, eid in sent.items() if eid in ids_of(observations)} == set(sent)
    worker.alive()


def test_duplicates_give_one_observation_also_after_a_restart(worker: Worker) -> None:
    event = new_lab(3.3)
    record = event_record(worker.topics, event)
    send(worker.settings, [record, record])
    marker = new_lab()
    send(worker.settings, [record, event_record(worker.topics, marker)])
    observations = wait_for(worker, worker.topics.observations, lambda rs: marker["event_id"] in ids_of(rs))
    assert ids_of(observations).count(event["event_id"]) == 1

    assert worker.stop() == 0  # SIGTERM: finish, commit, leave the group
    worker.start()
    after = new_lab()
    send(worker.settings, [record, event_record(worker.topics, after)])
    observations = wait_for(worker, worker.topics.observations, lambda rs: after["event_id"] in ids_of(rs), timeout=60)
    assert after["event_id"] in ids_of(observations)
    assert ids_of(observations).count(event["event_id"]) == 1
