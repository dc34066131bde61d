"""Replay of event logs and produce of event files."""

from __future__ import annotations

import json

from pathlib import Path

import pytest
from ingest_support import module_settings

from schemas import example, parse_time
from stream import KafkaSettings, Topics, ensure_topics, read_all, timestamp_ms
from stream.eventlog import write_events
from stream.replay import produce, replay


class RecordingProducer:
    """Stands in for EventProducer in the pacing test (pure logic: what is sent, when)."""

    def __init__(self, clock: list[float]) -> None:
        self.sent: list[tuple[str, str, int, float]] = []
        self.clock = clock

    def send(self, topic, key, value, *, timestamp_ms=None, headers=None):  # noqa: ANN001
        self.sent.append((topic, key, timestamp_ms, self.clock[0]))

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 30) -> None:
        pass


def _log(path: Path, cohort_events: list[dict]) -> Path:
    # Written shuffled: replay must restore event-time order itself.
    lines = [json.dumps(e) for e in reversed(cohort_events)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_replay_is_in_event_time_order_and_paced(tmp_path: Path, cohort_events: list[dict]) -> None:
    log = _log(tmp_path / "log.jsonl", cohort_events)
    clock = [0.0]
    producer = RecordingProducer(clock)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    speed = 86400.0  # a day per second
    summary = replay(KafkaSettings(), log, speed=speed, sleep=sleep, clock=lambda: clock[0], producer=producer)  # type: ignore[arg-type]
    assert summary.sent == len(cohort_events) and summary.rejected == 0
    stamps = [t for _, _, t, _ in producer.sent]
    assert stamps == sorted(stamps)
    first = min(parse_time(e["occurred_at"]) for e in cohort_events)
    for _, _, stamp, wall in producer.sent:
        expected = (stamp / 1000 - first.timestamp()) / speed
        assert wall == pytest.approx(expected, abs=1e-6)


def test_replay_window_and_fast_mode(tmp_path: Path, cohort_events: list[dict]) -> None:
    log = _log(tmp_path / "log.jsonl", cohort_events)
    times = sorted(parse_time(e["occurred_at"]) for e in cohort_events)
    since, until = times[10], times[40]
    producer = RecordingProducer([0.0])
    summary = replay(KafkaSettings(), log, since=since, until=until, sleep=lambda s: pytest.fail("slept"), producer=producer)  # type: ignore[arg-type]
    kept = [t for t in times if since <= t < until]
    assert summary.sent == len(kept) and summary.skipped == len(times) - len(kept)
    assert [s[2] for s in producer.sent] == [timestamp_ms(t) for t in kept]


@pytest.mark.integration
def test_produce_files_sends_valid_records_and_reports_the_rest(
    local_kafka: KafkaSettings, tmp_path: Path, cohort_events: list[dict]
) -> None:
    settings = module_settings(local_kafka, partitions=2)
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    log = tmp_path / "events.jsonl"
    write_events(log, cohort_events[:20])
    with log.open("a", encoding="utf-8") as f:
        f.write("{broken\n")
        bad = example("lab")
        bad["body"]["unit"] = "furlongs"
        f.write(json.dumps(bad) + "\n")
    single = tmp_path / "lab.json"
    single.write_text(json.dumps(example("lab")), encoding="utf-8")
    fhir = tmp_path / "psa.json"
    fhir.write_text(json.dumps({
        "resourceType": "Observation", "id": "psa-7", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1"}]},
        "subject": {"reference": "Patient/VP-0009"}, "effectiveDateTime": "2024-02-12",
        "valueQuantity": {"value": 6.1, "system": "http://unitsofmeasure.org", "code": "ng/mL"},
    }), encoding="utf-8")
    summary = produce(settings, [log, single, fhir])
    assert (summary.sent, summary.rejected, summary.failed) == (22, 2, 0)
    assert any(":21:" in p and "not valid JSON" in p for p in summary.problems)
    assert any("furlongs" in p for p in summary.problems)
    sent = [r for topic in topics.events() for r in read_all(settings, topic, timeout=10)]
    assert len(sent) == 22
    fhir_records = [r for r in sent if r.key == "VP-0009"]
    assert len(fhir_records) == 1 and fhir_records[0].topic == topics.lab
    assert json.loads(fhir_records[0].value)["resourceType"] == "Observation"  # sent as is
    by_id = {r.headers.get("event-id"): r for r in sent}
    for event in cohort_events[:20]:
        record = by_id[event["event_id"]]
        assert record.key == event["patient_id"] and record.topic == topics.event_topic(event["kind"])
        assert record.timestamp_ms == timestamp_ms(parse_time(event["occurred_at"]))


def test_produce_routes_a_medication_administration_in_a_bundle_to_the_treatment_topic(tmp_path: Path) -> None:
    from stream.replay import SendSummary, read_file

    admin = example("treatment.fhir-medication-administration")
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"resource": {"resourceType": "Patient", "id": "x"}}, {"resource": admin}]}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    summary = SendSummary()
    out = list(read_file(path, summary))
    assert [o.kind for o in out] == ["treatment"] and not summary.rejected
