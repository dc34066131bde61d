"""Dead letters: what a bad record becomes on ``oncotwin.deadletter.v1``.

A dead letter is a JSON object that tells a person what to fix: the stage that refused the
record, a reason naming the field and what was expected, the individual issues, where the record
came from (topic, partition, offset, key, timestamp, headers) and the original bytes (base64),
so the record can be repaired and re-sent.

A dead letter always fits in a Kafka record, whatever the record it stands for held (a 1.5 MB
key, thousands of headers, a value near the broker's limit, a reason quoting a huge value): each
part is cut to a budget (``MAX_*`` below; bytes as the part takes them in the JSON, escapes
included), and ``to_bytes`` never exceeds ``MAX_DEADLETTER_BYTES``, well under the 1,000,000
bytes of librdkafka's ``message.max.bytes`` that our producers keep. A part that was cut is
listed under ``cut`` with its whole size in bytes and the SHA-256 of its whole UTF-8 text (the
headers and the issues: of their compact JSON; the original: of its bytes), and ``truncated``
says that something was; parts not listed there are whole. A "bare" dead letter (``as_bare``) keeps only the record's coordinates, for when the
whole one could not be published.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

DEADLETTER_SCHEMA = "oncotwin.deadletter/1"
# Budgets of the parts, in bytes of the JSON text (UTF-8, escapes included). Their sum with the
# fixed fields is ~786 kB: base64 of the original 699 kB, headers 37 kB, issues 42 kB, ...
MAX_ORIGINAL_BYTES = 512 * 1024  # of the original value itself (base64 makes 4/3 of it)
MAX_KEY_BYTES = 1024
MAX_HEADERS = 32
MAX_HEADER_NAME_BYTES = 128
MAX_HEADER_VALUE_BYTES = 1024
MAX_REASON_BYTES = 4096
MAX_ISSUES = 32
MAX_ISSUE_FIELD_BYTES = 256
MAX_ISSUE_MESSAGE_BYTES = 1024
MAX_NAME_BYTES = 256  # stage, topic, event id, kind
#: What ``to_bytes`` never exceeds; the Kafka record adds the key (<= MAX_KEY_BYTES) and headers.
MAX_DEADLETTER_BYTES = 800_000

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

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
    "duplicate",  # an event_id already published with other content
    "publish",  # the brokers refuse the observation for good (an event time a record cannot carry)
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
    bare: bool = False  # only the record's coordinates and the reason: see as_bare()

    def to_dict(self, failed_at: datetime | None = None) -> dict[str, Any]:
        cut: list[dict[str, Any]] = []

        def text(part: str, value: str | None, limit: int) -> str | None:
            if value is None:
                return None
            kept = _cut(value, limit)
            if len(kept) < len(value):
                cut.append({"part": part, **_whole(_utf8(value))})
            return kept

        original = self.original or b""
        kept = b"" if self.bare else original[:MAX_ORIGINAL_BYTES]
        if len(kept) < len(original):
            cut.append({"part": "original", **_whole(original)})
        whole_headers = dict(self.headers)
        headers = {
            _cut(name, MAX_HEADER_NAME_BYTES): _cut(value, MAX_HEADER_VALUE_BYTES)
            for name, value in list(whole_headers.items())[: 0 if self.bare else MAX_HEADERS]
        }
        if headers != whole_headers:  # also when two names cut alike merged
            cut.append({"part": "source.headers", "count": len(whole_headers), "kept": len(headers),
                        **_whole_json(whole_headers)})
        whole_issues = [{"field": i.field, "message": i.message} for i in self.issues]
        issues = [
            {"field": _cut(i["field"], MAX_ISSUE_FIELD_BYTES), "message": _cut(i["message"], MAX_ISSUE_MESSAGE_BYTES)}
            for i in whole_issues[: 0 if self.bare else MAX_ISSUES]
        ]
        if issues != whole_issues:
            cut.append({"part": "issues", "count": len(whole_issues), "kept": len(issues), **_whole_json(whole_issues)})
        return {
            "schema": DEADLETTER_SCHEMA,
            "failed_at": (failed_at or datetime.now(timezone.utc)).isoformat(),
            "stage": text("stage", self.stage, MAX_NAME_BYTES),
            "reason": text("reason", self.reason, MAX_REASON_BYTES),
            "issues": issues,
            "event_id": text("event_id", self.event_id, MAX_NAME_BYTES),
            "kind": text("kind", self.kind, MAX_NAME_BYTES),
            "source": {
                "topic": text("source.topic", self.topic, MAX_NAME_BYTES),
                "partition": self.partition,
                "offset": self.offset,
                "key": text("source.key", self.key, MAX_KEY_BYTES),
                "timestamp_ms": self.timestamp_ms,
                "headers": headers,
            },
            "original_base64": base64.b64encode(kept).decode("ascii") if self.original is not None and not self.bare else None,
            "original_size": len(original),
            "original_truncated": len(kept) < len(original),
            "original_sha256": hashlib.sha256(original).hexdigest(),
            "truncated": bool(cut),
            "cut": cut,
        }

    def to_bytes(self, failed_at: datetime | None = None) -> bytes:
        """The dead letter as JSON, at most ``MAX_DEADLETTER_BYTES``."""
        text = json.dumps(self.to_dict(failed_at), separators=(",", ":"), ensure_ascii=False)
        # A lone surrogate (no UTF-8 carries one) is written as its JSON escape, \udXXX: it can
        # only stand inside a string, so the document stays JSON and reads back the same.
        return text.encode("utf-8", "backslashreplace")

    def record_key(self) -> str | None:
        """The key of the dead letter's Kafka record: the source key, cut like ``source.key``."""
        return None if self.key is None else _cut(self.key, MAX_KEY_BYTES)

    @property
    def record_timestamp_ms(self) -> int | None:
        """The dead letter's record timestamp: the source record's, where Kafka can carry it
        (a bare dead letter takes the time of publishing: the source's may be why it failed)."""
        if self.bare or self.timestamp_ms is None or self.timestamp_ms <= 0:
            return None
        return self.timestamp_ms

    def record_headers(self) -> dict[str, str]:
        headers = {
            "content-type": "application/json",
            "deadletter-stage": _cut(self.stage, MAX_NAME_BYTES),
            "source-topic": _cut(self.topic, MAX_NAME_BYTES),
            "source-partition": str(self.partition),
            "source-offset": str(self.offset),
        }
        if self.event_id:
            headers["event-id"] = _cut(self.event_id, MAX_NAME_BYTES)
        return headers

    def as_bare(self, note: str) -> DeadLetter:
        """This dead letter without the original, the headers and the issues (their sizes and
        digests stay under ``cut``), ``note`` saying why before the reason: what is published
        when the whole dead letter could not be."""
        return replace(self, bare=True, reason=f"{note}; {self.reason}")

    def log_context(self) -> str:
        """What a log line may say about this dead letter: where the record came from, the
        stage, the event id (when it is a UUID) and the field paths of the issues. Never the
        reason or the key: they can quote the record's values (a pseudonym, a measurement)."""
        event = self.event_id if self.event_id and _UUID.fullmatch(self.event_id) else "-"
        fields = sorted({_log_field(i.field) for i in self.issues[:MAX_ISSUES]})
        return (f"{self.topic}[{self.partition}]@{self.offset} stage={self.stage} event={event} "
                f"fields={','.join(fields) or '-'}")


def failure_trace(exc: BaseException) -> str:
    """An exception as a log line may show it: its type and where it was raised, without its
    message (which can quote the record's values)."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in reversed(frames))
    return f"{type(exc).__name__} at {where or '?'}"


def _log_field(path: str) -> str:
    # A SHACL issue's field is "<focus IRI> <property path>", and a patient's IRI holds its
    # pseudonym: only the property path goes to the log.
    head, _, tail = path.partition(" ")
    if tail and (":" in head):
        path = tail
    return path[:120]


def _cut(text: str, limit: int) -> str:
    """``text``, or a prefix of it that takes at most ``limit`` bytes in ``to_bytes``."""
    if len(text) * 6 <= limit:  # no character takes more than 6 bytes (an escape: \u0001)
        return text
    head = text[:limit]  # and none takes less than 1
    size = _json_size(head)
    while size > limit:
        head = head[: len(head) * limit // size]
        size = _json_size(head)
    return head


def _json_size(text: str) -> int:
    """Bytes ``text`` takes as a JSON string in ``to_bytes``, quotes excluded."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8", "backslashreplace")) - 2


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _whole(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _whole_json(value: Any) -> dict[str, Any]:
    """``_whole`` of ``value`` as compact JSON, encoded piece by piece (the whole text of a
    cut part can be many times the record: thousands of headers, each escaped)."""
    digest, size = hashlib.sha256(), 0
    for piece in json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).iterencode(value):
        data = _utf8(piece)
        digest.update(data)
        size += len(data)
    return {"size": size, "sha256": digest.hexdigest()}


def original_bytes(document: Mapping[str, Any]) -> bytes | None:
    """The original value of a dead letter (None when the record had none)."""
    encoded = document.get("original_base64")
    return base64.b64decode(encoded) if encoded is not None else None


def issues_from(pairs: Sequence[tuple[str, str]]) -> tuple[Issue, ...]:
    return tuple(Issue(f, m) for f, m in pairs)
