"""Sending events to Kafka from files: replay of an event log, and produce of event files.

``replay`` sends a JSONL event log in event-time order, each record keyed by the patient
pseudonym with its event time as the record timestamp, either as fast as possible or paced so
that wall time runs ``speed`` times faster than event time (``--speed 86400`` plays a day per
second). ``--from`` / ``--until`` keep the events whose occurred_at lies in [from, until).

``produce`` sends JSONL logs, JSON events (one or a list), FHIR R4 Observations and
MedicationAdministrations, and FHIR Bundles of them to the topic of their kind. Anything that would be dead-lettered for
its content is refused here already ("rejected locally", with the reason), so a producer
learns at once; the normalizer still checks everything it receives.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from schemas import parse_time, validate
from stream.eventlog import read_lines
from stream.fhir import FhirError, is_fhir, resource_to_event

# The FHIR resources that are events (stream.fhir.resource_to_event converts them).
FHIR_EVENT_RESOURCES = ("Observation", "MedicationAdministration")
from stream.producer import DeliveryError, EventProducer, record_headers, timestamp_ms
from stream.settings import KafkaSettings
from stream.topics import Topics

log = logging.getLogger(__name__)


@dataclass
class SendSummary:
    sent: int = 0
    rejected: int = 0  # refused before sending (not JSON, not valid, not routable)
    failed: int = 0  # sent but not acknowledged by the brokers
    skipped: int = 0  # outside --from/--until
    problems: list[str] = field(default_factory=list)  # "file:line: reason", the first 100

    def reject(self, where: str, reason: str) -> None:
        self.rejected += 1
        if len(self.problems) < 100:
            self.problems.append(f"{where}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "rejected": self.rejected, "failed": self.failed, "skipped": self.skipped}


@dataclass(frozen=True)
class Outgoing:
    """One record to send: where it came from, its topic, key, value, timestamp."""

    where: str
    kind: str
    key: str
    value: bytes
    occurred_at: datetime
    event_id: str


def _route(document: Any, raw: bytes, where: str, summary: SendSummary) -> Outgoing | None:
    if is_fhir(document):
        try:
            event = resource_to_event(document).event
        except FhirError as exc:
            summary.reject(where, f"{exc.field}: {exc.reason}")
            return None
        issues = validate(event)
        if issues:
            summary.reject(where, "; ".join(i.message for i in issues[:3]))
            return None
        # The normalizer converts FHIR itself: the original resource is what travels.
        return Outgoing(where, event["kind"], event["patient_id"], raw, parse_time(event["occurred_at"]), event["event_id"])
    issues = validate(document)
    if issues:
        summary.reject(where, "; ".join(i.message for i in issues[:3]))
        return None
    return Outgoing(where, document["kind"], document["patient_id"], raw, parse_time(document["occurred_at"]), document["event_id"])


def read_file(path: Path, summary: SendSummary) -> Iterator[Outgoing]:
    """The sendable records of a JSONL log or a JSON file (event, list, FHIR resource or Bundle)."""
    path = Path(path)
    if path.suffix in (".jsonl", ".ndjson"):
        for number, raw in read_lines(path):
            where = f"{path}:{number}"
            try:
                document = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                summary.reject(where, f"not valid JSON ({exc})")
                continue
            out = _route(document, raw, where, summary)
            if out is not None:
                yield out
        return
    raw = path.read_bytes()
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        summary.reject(str(path), f"not valid JSON ({exc})")
        return
    if isinstance(document, dict) and document.get("resourceType") == "Bundle":
        for index, entry in enumerate(document.get("entry") or []):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            where = f"{path}#entry[{index}]"
            if not isinstance(resource, dict) or resource.get("resourceType") not in FHIR_EVENT_RESOURCES:
                continue  # Patients, Conditions... of a bundle are not events
            out = _route(resource, json.dumps(resource, ensure_ascii=False).encode(), where, summary)
            if out is not None:
                yield out
        return
    items = document if isinstance(document, list) else [document]
    for index, item in enumerate(items):
        where = f"{path}[{index}]" if isinstance(document, list) else str(path)
        value = raw if not isinstance(document, list) else json.dumps(item, ensure_ascii=False).encode()
        out = _route(item, value, where, summary)
        if out is not None:
            yield out


def _send(producer: EventProducer, topics: Topics, out: Outgoing, summary: SendSummary) -> None:
    try:
        producer.send(
            topics.event_topic(out.kind),
            out.key,
            out.value,
            timestamp_ms=timestamp_ms(out.occurred_at),
            headers=record_headers(event_id=out.event_id, kind=out.kind),
        )
        summary.sent += 1
    except DeliveryError as exc:
        summary.failed += exc.total_failed


def _flush(producer: EventProducer, summary: SendSummary, timeout: float, *, close: bool = False) -> None:
    """Wait for acknowledgements; records the brokers refused count as failed."""
    try:
        producer.close(timeout) if close else producer.flush(timeout)
    except DeliveryError as exc:
        summary.failed += exc.total_failed


def produce(settings: KafkaSettings, files: Iterable[Path], *, producer: EventProducer | None = None) -> SendSummary:
    """Send every valid record of ``files`` to its event topic; returns what happened."""
    summary = SendSummary()
    topics = Topics.from_settings(settings)
    own = producer is None
    producer = producer or EventProducer(settings)
    try:
        for path in files:
            for out in read_file(Path(path), summary):
                _send(producer, topics, out, summary)
        _flush(producer, summary, 60)
    finally:
        if own:
            _flush(producer, summary, 10, close=True)
    summary.sent = max(0, summary.sent - summary.failed)
    return summary


def select_events(
    records: Iterable[Outgoing], since: datetime | None = None, until: datetime | None = None, summary: SendSummary | None = None
) -> list[Outgoing]:
    """Records with since <= occurred_at < until, in event-time order (ties by event id)."""
    kept = []
    for r in records:
        if (since is not None and r.occurred_at < since) or (until is not None and r.occurred_at >= until):
            if summary is not None:
                summary.skipped += 1
            continue
        kept.append(r)
    return sorted(kept, key=lambda r: (r.occurred_at, r.event_id))


def replay(
    settings: KafkaSettings,
    log_path: Path,
    *,
    speed: float | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    producer: EventProducer | None = None,
) -> SendSummary:
    """Replay a JSONL log in event-time order; ``speed`` None (or <= 0) sends as fast as possible."""
    summary = SendSummary()
    records = select_events(read_file(Path(log_path), summary), since, until, summary)
    topics = Topics.from_settings(settings)
    own = producer is None
    producer = producer or EventProducer(settings)
    try:
        start_wall = clock()
        first = records[0].occurred_at if records else None
        for out in records:
            if speed and speed > 0 and first is not None:
                due = (out.occurred_at - first).total_seconds() / speed
                wait = due - (clock() - start_wall)
                if wait > 0:
                    producer.poll(0)
                    sleep(wait)
            _send(producer, topics, out, summary)
        _flush(producer, summary, 60)
    finally:
        if own:
            _flush(producer, summary, 10, close=True)
    summary.sent = max(0, summary.sent - summary.failed)
    return summary

