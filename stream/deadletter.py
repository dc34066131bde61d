"""Dead letters: what a bad record becomes on ``oncotwin.deadletter.v1``.

A dead letter is a JSON object that tells a person what to fix: the stage that refused the
record, a reason naming the field and what was expected, the individual issues, where the record
came from (topic, partition, offset, key, timestamp, headers) and the original bytes (base64),
so the record can be repaired and re-sent. Originals beyond ``MAX_ORIGINAL_BYTES`` are cut (the
dead letter must itself fit in a Kafka record) and carry the SHA-256 of the whole value.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

DEADLETTER_SCHEMA = "oncotwin.deadletter/1"
MAX_ORIGINAL_BYTES = 512 * 1024

STAGES = (
    "size",  # empty or oversize record
    "parse",  # not UTF-8 JSON
    "fhir",  # a FHIR resource that cannot become an event
    "schema",  # the event contract (JSON Schema, values)
    "code",  # a code not in the term table
    "unit",  # a unit unknown or not convertible to the term's unit
    "routing",  # an event on the topic of another kind
    "time",  # an event far in the future
    "claim-check",  # a claim check that does not resolve under the root or does not verify
    "dicom",  # a DICOM file that is broken or does not match the event
    "nifti",  # a segmentation or density map that cannot be read or measured
    "shacl",  # the RDF graph violates the shapes
    "rdf",  # the RDF graph holds an IRI the store cannot take
    "internal",  # a bug: the normalizer failed on this record
)


@dataclass(frozen=True)
class Issue:
    field: str
    message: str


@dataclass(frozen=True)
class DeadLetter:
    stage: str
    reason: str
    topic: str
    partition: int
    offset: int
    key: str | None
    original: bytes | None
    issues: tuple[Issue, ...] = ()
    timestamp_ms: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    event_id: str | None = None
    kind: str | None = None

    def to_dict(self, failed_at: datetime | None = None) -> dict[str, Any]:
        original = self.original or b""
        kept = original[:MAX_ORIGINAL_BYTES]
        return {
            "schema": DEADLETTER_SCHEMA,
            "failed_at": (failed_at or datetime.now(timezone.utc)).isoformat(),
            "stage": self.stage,
            "reason": self.reason,
            "issues": [{"field": i.field, "message": i.message} for i in self.issues],
            "event_id": self.event_id,
            "kind": self.kind,
            "source": {
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "key": self.key,
                "timestamp_ms": self.timestamp_ms,
                "headers": dict(self.headers),
            },
            "original_base64": base64.b64encode(kept).decode("ascii") if self.original is not None else None,
            "original_size": len(original),
            "original_truncated": len(kept) < len(original),
            "original_sha256": hashlib.sha256(original).hexdigest(),
        }

    def to_bytes(self, failed_at: datetime | None = None) -> bytes:
        return json.dumps(self.to_dict(failed_at), separators=(",", ":"), ensure_ascii=False).encode()

    def record_headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "deadletter-stage": self.stage,
            "source-topic": self.topic,
            "source-partition": str(self.partition),
            "source-offset": str(self.offset),
        }
        if self.event_id:
            headers["event-id"] = self.event_id
        return headers


def original_bytes(document: Mapping[str, Any]) -> bytes | None:
    """The original value of a dead letter (None when the record had none)."""
    encoded = document.get("original_base64")
    return base64.b64decode(encoded) if encoded is not None else None


def issues_from(pairs: Sequence[tuple[str, str]]) -> tuple[Issue, ...]:
    return tuple(Issue(f, m) for f, m in pairs)
