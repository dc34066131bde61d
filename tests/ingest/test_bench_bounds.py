"""The parts bench.stream --bounds swaps into the normalizer worker: they must do what the bound
claims (cost nothing for the part they replace) and nothing less for the rest."""

from __future__ import annotations

import json
from pathlib import Path

from bench.stream import null_store, precomputed_normalizer, write_events_file
from stream.normalizer import Normalizer, NormalizerSettings, SourceRecord
from stream.topics import Topics

TOPICS = Topics("bounds")


def _events_file(tmp_path: Path, events: list[dict]) -> Path:
    path = tmp_path / "events.jsonl"
    write_events_file(path, [(e["kind"], e["patient_id"], json.dumps(e).encode()) for e in events])
    return path


def _record(event: dict, partition: int, offset: int) -> SourceRecord:
    return SourceRecord(TOPICS.event_topic(event["kind"]), partition, offset, event["patient_id"], json.dumps(event).encode())


def test_precomputed_normalizer_answers_what_the_normalizer_gave(tmp_path: Path, cohort: Path, cohort_events: list[dict]) -> None:
    settings = NormalizerSettings(imaging_root=cohort)
    bound = precomputed_normalizer(settings, TOPICS, _events_file(tmp_path, cohort_events))
    # Precomputed with the provenance of the file (partition 0, offset = line number).
    expected = Normalizer(settings, TOPICS).process([_record(e, 0, i) for i, e in enumerate(cohort_events)])
    assert len(bound.known) == len(cohort_events) == len(expected.observations)

    records = [_record(e, 3, 100 + i) for i, e in enumerate(cohort_events)]
    seen_id = cohort_events[0]["event_id"]
    result = bound.process([*records, SourceRecord(TOPICS.event_topic("lab"), 3, 999, "k", b"{not json")], seen=lambda e: e == seen_id)

    assert result.duplicates == [(seen_id, records[0])]
    assert [o.value for o in result.observations] == [o.value for o in expected.observations[1:]]
    assert [o.ntriples for o in result.observations] == [o.ntriples for o in expected.observations[1:]]
    # Each answer belongs to the record it answers (its offsets are what gets committed).
    assert [o.source for o in result.observations] == records[1:]
    # What it does not know it normalizes as usual: a bad record is still dead-lettered.
    assert [(d.stage, d.offset) for d in result.dead_letters] == [("parse", 999)]


def test_null_store_keeps_nothing_but_remembers_what_was_marked() -> None:
    store = null_store(Path("unused"))
    graph = "<urn:x:s> <urn:x:p> <urn:x:o> .\n"
    written = store.write([("e1", graph), ("e2", graph)])
    store.mark(written)
    assert written == ["e1", "e2"]
    assert len(store) == 0
    assert store.contains_event("e1") and store.contains_event("e2")
    assert not store.contains_event("e3")
