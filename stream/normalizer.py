"""The normalizer: a raw event record in, an observation (JSON-LD) or a dead letter out.

Pure: no Kafka, no store. ``Normalizer.process`` takes a micro-batch of records and returns,
for each, either an ``Observation`` ready to publish (key, value, headers, timestamp) or a
``DeadLetter``; records whose event id was seen before come back as duplicates. The stages,
in order (each failure names its stage in the dead letter):

    size -> parse (UTF-8 JSON without a byte-order mark, no key twice in an object)
    -> fhir (a FHIR Observation on the lab or ctdna topic, a MedicationAdministration on the
       treatment topic, is converted)
    -> schema / code / unit (schemas.normalize_event: the contract, terms and canonical units)
    -> routing (the event's kind is the topic's; a record key, if any, is the event's patient)
    -> time (not far in the future)
    -> claim-check / dicom / nifti (stream.imaging) -> RDF -> shacl (the whole batch at once)

Nothing a record holds can raise out of ``process``: an unexpected failure becomes a dead letter
of stage ``internal`` (and is logged with its traceback). Fields the contract does not name are
carried through as extensions, never refused; the first time a field path is seen on a topic
it is logged (the path only, never its value), so a feed's new fields come to notice.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

from schemas import ContractError, EventValidationError, normalize_event, parse_time
from schemas.validate import format_path
from stream.deadletter import DeadLetter, Issue, failure_trace
from stream.fhir import RESOURCE_TOPIC_KINDS, FhirError, is_fhir, resource_to_event
from stream.imaging import FileCheckError, ImagingConfig, file_facts
from stream.producer import record_headers, timestamp_ms
from stream.rdf import CONTENT_TYPE_JSONLD, EventGraph, Provenance, build_event_graph
from stream.shapes import ShapeValidator, describe
from stream.topics import Topics

log = logging.getLogger(__name__)

# name -> (default, help), in the shape of stream.settings.ENV_VARS.
ENV_VARS: dict[str, tuple[str, str]] = {
    "ONCOTWIN_IMAGING_ROOT": ("", "root under which imaging claim checks are resolved (default: ONCOTWIN_DATA_DIR)"),
    "ONCOTWIN_DICOMWEB_BASE": ("", "base URL of the DICOMweb server whose URLs claim checks may use; empty refuses URLs"),
    "ONCOTWIN_MAX_RECORD_BYTES": ("1000000", "records larger than this go to the dead-letter topic"),
    "ONCOTWIN_FUTURE_SKEW_S": ("86400", "events whose occurred_at is further in the future than this are refused"),
    "ONCOTWIN_SHACL_ENGINE": ("compiled", "compiled (fast, SHACL Core subset checked against pyshacl) or pyshacl"),
}

FHIR_TOPIC_KINDS = tuple(dict.fromkeys(k for kinds in RESOURCE_TOPIC_KINDS.values() for k in kinds))
# Extension field paths already logged, per topic: bounded, as feeds could send ever new names.
_MAX_LOGGED_EXTENSIONS = 10_000


@dataclass(frozen=True)
class NormalizerSettings:
    imaging_root: Path | None = None
    dicomweb_base: str | None = None
    max_record_bytes: int = 1_000_000
    future_skew: timedelta = timedelta(days=1)
    shacl_engine: str = "compiled"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NormalizerSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str:
            return (env.get(name, "") or ENV_VARS[name][0]).strip()

        root = get("ONCOTWIN_IMAGING_ROOT") or env.get("ONCOTWIN_DATA_DIR", "") or "data"
        try:
            max_bytes = int(get("ONCOTWIN_MAX_RECORD_BYTES"))
            skew = float(get("ONCOTWIN_FUTURE_SKEW_S"))
        except ValueError as exc:
            raise ValueError(f"ONCOTWIN_MAX_RECORD_BYTES and ONCOTWIN_FUTURE_SKEW_S must be numbers: {exc}") from exc
        if max_bytes < 1 or skew < 0:
            raise ValueError("ONCOTWIN_MAX_RECORD_BYTES must be >= 1 and ONCOTWIN_FUTURE_SKEW_S >= 0")
        return cls(
            imaging_root=Path(root),
            dicomweb_base=get("ONCOTWIN_DICOMWEB_BASE") or None,
            max_record_bytes=max_bytes,
            future_skew=timedelta(seconds=skew),
            shacl_engine=get("ONCOTWIN_SHACL_ENGINE"),
        )


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A record as read from an event topic."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes | None
    headers: Mapping[str, str] = field(default_factory=dict)
    timestamp_ms: int | None = None


@dataclass(slots=True)
class Observation:
    """A normalized event, ready to publish on the observations topic."""

    event_id: str
    patient_id: str
    kind: str
    occurred_at: datetime
    graph: EventGraph
    source: SourceRecord
    value: bytes = b""  # JSON-LD, filled once the batch passed SHACL
    ntriples: str = ""  # what the RDF store loads (EventGraph.ntriples), filled with value
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.patient_id

    @property
    def timestamp_ms(self) -> int:
        return timestamp_ms(self.occurred_at)


@dataclass
class BatchResult:
    observations: list[Observation] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: list[tuple[str, SourceRecord]] = field(default_factory=list)  # (event id, record)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Normalizer:
    """Normalizes micro-batches of event records (thread-compatible, not thread-safe)."""

    def __init__(
        self,
        settings: NormalizerSettings,
        topics: Topics,
        *,
        clock: Callable[[], datetime] = utc_now,
        shapes: ShapeValidator | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.clock = clock
        self.shapes = shapes or ShapeValidator(settings.shacl_engine)
        self.imaging = ImagingConfig(settings.imaging_root, settings.dicomweb_base, settings.future_skew)
        self._extension_paths: set[tuple[str, str]] = set()

    # -- per record ----------------------------------------------------------------------

    def prepare(self, record: SourceRecord, now: datetime | None = None) -> Observation | DeadLetter:
        """Every stage but SHACL for one record."""
        try:
            return self._prepare(record, now or self.clock())
        except Exception as exc:  # noqa: BLE001  (a bad record must never stop the agent)
            # The message stays in the dead letter: it can quote the record's values.
            log.error("normalizer failed on %s[%d]@%d: %s", record.topic, record.partition, record.offset,
                      failure_trace(exc))
            return self._dead(record, "internal", f"the normalizer failed on this record ({type(exc).__name__}: {str(exc)[:200]}); please report it")

    def _prepare(self, record: SourceRecord, now: datetime) -> Observation | DeadLetter:
        value = record.value
        if value is None or len(value) == 0:
            return self._dead(record, "size", "the record has no value (an event is a UTF-8 JSON object)")
        if len(value) > self.settings.max_record_bytes:
            return self._dead(
                record, "size",
                f"the record has {len(value)} bytes, more than the {self.settings.max_record_bytes} accepted "
                "(pixels travel by claim check, never in the event)",
            )
        try:
            document = orjson.loads(value)
        except orjson.JSONDecodeError:
            # orjson reads strict JSON only: the standard parser gives its messages (and takes
            # what it also accepts, NaN and huge integers, which the contract then refuses).
            document = self._parse_lenient(record, value)
        else:
            if _may_repeat_keys(value, document):
                document = self._parse_lenient(record, value)  # finds the key, if one repeats
        if isinstance(document, DeadLetter):
            return document
        return self._prepare_document(record, document, now)

    def _parse_lenient(self, record: SourceRecord, value: bytes) -> Any:
        foreign = _foreign_encoding(value)
        if foreign is not None:
            return self._dead(record, "parse", f"the value {foreign}: an event is UTF-8 JSON without a byte-order mark")
        try:
            # Decoded here, strictly: json.loads(bytes) would guess UTF-16 or UTF-32, skip a
            # byte-order mark and let encoded surrogates through.
            document = json.loads(value.decode("utf-8"), object_pairs_hook=_json_object)
            repeated = _repeated_key(document)
            if repeated is not None:
                return self._dead(
                    record, "parse",
                    f"{repeated}: this key appears more than once in its object, and JSON readers differ on "
                    "which of its values counts: send every key once",
                    issues=(Issue(repeated, "key repeated in its object"),),
                )
            where = _lone_surrogate(document)
            if where is not None:
                # json accepts "\ud800" escapes that encode no character; nothing downstream
                # (orjson, UTF-8 topics, the RDF store) can carry them.
                return self._dead(
                    record, "parse",
                    f"{where}: a lone UTF-16 surrogate escape is not Unicode text (pair it or remove it)",
                    issues=(Issue(where, "lone surrogate escape"),),
                )
            return document
        except UnicodeDecodeError as exc:
            return self._dead(record, "parse", f"the value is not UTF-8 text (byte {exc.start}): an event is UTF-8 JSON")
        except json.JSONDecodeError as exc:
            return self._dead(record, "parse", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        except RecursionError:
            return self._dead(record, "parse", "not valid JSON: nested too deeply")

    def _prepare_document(self, record: SourceRecord, document: Any, now: datetime) -> Observation | DeadLetter:
        topic_kind = self.topics.kind_of(record.topic)
        if is_fhir(document):
            resource_type = document.get("resourceType")
            kinds = RESOURCE_TOPIC_KINDS.get(resource_type) if isinstance(resource_type, str) else None
            if kinds is not None and topic_kind not in kinds:
                return self._dead(
                    record, "fhir",
                    f"resourceType: a FHIR {resource_type} is accepted on the {' and '.join(kinds)} "
                    f"topic{'s' if len(kinds) > 1 else ''} only, not on {record.topic}",
                    issues=(Issue("resourceType", "not accepted on this topic"),),
                )
            try:
                document = resource_to_event(document, source=f"fhir:{record.topic}").event
            except FhirError as exc:
                return self._dead(record, "fhir", f"{exc.field}: {exc.reason}", issues=(Issue(exc.field, exc.reason),))

        try:
            event = normalize_event(document)
        except EventValidationError as exc:
            stage = _stage_of(exc.issues)
            issues = tuple(Issue(i.path, i.message) for i in exc.issues)
            return self._dead(record, stage, _summary(issues), issues=issues, document=document)
        except ContractError as exc:
            return self._dead(record, "unit", str(exc)[:400], document=document)

        kind = event["kind"]
        if topic_kind != kind:
            expected = self.topics.event_topic(kind)
            return self._dead(
                record, "routing",
                f"a {kind} event arrived on {record.topic}; {kind} events belong on {expected}",
                document=event,
            )
        if record.key and record.key != event["patient_id"]:
            # Neither value is quoted: both are identifiers (the dead letter keeps the record).
            return self._dead(
                record, "routing",
                "the record key is not the event's patient_id: an event record is keyed by the patient pseudonym "
                "in its body (or has no key), so that one patient's events share a partition and keep their order",
                issues=(Issue("patient_id", "differs from the record key"),),
                document=event,
            )
        occurred_at = parse_time(event["occurred_at"])
        if occurred_at > now + self.settings.future_skew:
            return self._dead(
                record, "time",
                f"occurred_at {event['occurred_at']} is more than {self.settings.future_skew} in the future "
                f"(now {now.isoformat(timespec='seconds')}): check the clock or the time zone of the feed",
                issues=(Issue("occurred_at", "in the future"),),
                document=event,
            )
        try:
            files = file_facts(event, self.imaging, now, occurred_at)
        except FileCheckError as exc:
            return self._dead(record, exc.stage, str(exc), issues=(Issue(exc.field, exc.reason),), document=event)
        graph = build_event_graph(event, Provenance(record.topic, record.partition, record.offset), files)
        if event["extensions"]:
            self._note_extensions(record, event)
        return Observation(event["event_id"], event["patient_id"], kind, occurred_at, graph, record)

    def _note_extensions(self, record: SourceRecord, event: dict[str, Any]) -> None:
        for path in event["extensions"]:
            key = (record.topic, path[:200])
            if key in self._extension_paths or len(self._extension_paths) >= _MAX_LOGGED_EXTENSIONS:
                continue
            self._extension_paths.add(key)
            # The path is a field name the feed chose: logged, its value never is.
            log.info("extension field %r first seen on %s (event %s, %s[%d]@%d): carried through, not checked",
                     key[1], record.topic, event["event_id"], record.topic, record.partition, record.offset)

    def _dead(
        self,
        record: SourceRecord,
        stage: str,
        reason: str,
        *,
        issues: tuple[Issue, ...] = (),
        document: Any = None,
    ) -> DeadLetter:
        event_id = kind = None
        if isinstance(document, dict):
            if isinstance(document.get("event_id"), str):
                event_id = document["event_id"][:64]
            if isinstance(document.get("kind"), str):
                kind = document["kind"][:32]
        return DeadLetter(
            stage=stage,
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            original=record.value,
            issues=issues,
            timestamp_ms=record.timestamp_ms,
            headers=dict(record.headers),
            event_id=event_id,
            kind=kind,
        )

    # -- per batch -----------------------------------------------------------------------

    def process(self, records: Sequence[SourceRecord], seen: Callable[[str], bool] | None = None) -> BatchResult:
        """Normalize a micro-batch; ``seen(event_id)`` tells which events were published before.

        Never raises for what a record holds: each stage dead-letters its own failures, and a
        failure none of them caught makes the batch go again record by record, so that only
        the record it comes from is dead-lettered (a poison pill would otherwise fail its
        batch at every redelivery)."""
        try:
            return self._process(records, seen)
        except Exception as exc:  # noqa: BLE001
            log.error("normalizing a batch of %d records failed (%s); going again record by record",
                      len(records), failure_trace(exc))
        result = BatchResult()
        for record in records:
            try:
                one = self._process([record], seen)
            except Exception as exc:  # noqa: BLE001
                result.dead_letters.append(self._dead(
                    record, "internal",
                    f"the normalizer failed on this record ({type(exc).__name__}: {str(exc)[:200]}); please report it",
                ))
                continue
            if one.observations and any(o.event_id == one.observations[0].event_id for o in result.observations):
                result.duplicates.append((one.observations[0].event_id, record))  # twice in this batch
                continue
            result.observations.extend(one.observations)
            result.dead_letters.extend(one.dead_letters)
            result.duplicates.extend(one.duplicates)
        return result

    def _process(self, records: Sequence[SourceRecord], seen: Callable[[str], bool] | None) -> BatchResult:
        now = self.clock()
        result = BatchResult()
        pending: list[Observation] = []
        batch_ids: set[str] = set()
        for record in records:
            outcome = self.prepare(record, now)
            if isinstance(outcome, DeadLetter):
                result.dead_letters.append(outcome)
                continue
            if outcome.event_id in batch_ids or (seen is not None and seen(outcome.event_id)):
                result.duplicates.append((outcome.event_id, record))
                continue
            batch_ids.add(outcome.event_id)
            pending.append(outcome)
        try:
            verdicts = self.shapes.validate_batch([o.graph for o in pending])
        except Exception as exc:  # noqa: BLE001  (the validator itself failed: judge graphs one by one)
            log.error("SHACL validation of a batch failed (%s); validating its graphs one by one", failure_trace(exc))
            verdicts = [self._validate_one(o) for o in pending]
        for observation, violations in zip(pending, verdicts):
            if violations:
                result.dead_letters.append(
                    self._dead(
                        observation.source, "shacl",
                        f"the RDF of this event violates the SHACL shapes: {describe(violations)}",
                        issues=tuple(Issue(f"{v.focus} {v.path}".strip(), v.message) for v in violations[:20]),
                        document={"event_id": observation.event_id, "kind": observation.kind},
                    )
                )
                continue
            ids = {"event_id": observation.event_id, "kind": observation.kind}
            try:
                observation.ntriples = observation.graph.ntriples()
                observation.value = observation.graph.jsonld_bytes()
                observation.headers = record_headers(
                    content_type=CONTENT_TYPE_JSONLD,
                    schema_version=observation.graph.primary.first("https://w3id.org/oncotwin/ns#schemaVersion") or "1.0",
                    event_id=observation.event_id,
                    kind=observation.kind,
                )
            except (ValueError, TypeError) as exc:  # what N-Quads or orjson cannot carry
                result.dead_letters.append(
                    self._dead(observation.source, "rdf", f"the event's RDF cannot be stored: {exc}", document=ids)
                )
                continue
            except Exception as exc:  # noqa: BLE001  (one record must never fail its batch)
                log.error("serializing event %s failed: %s", observation.event_id, failure_trace(exc))
                result.dead_letters.append(
                    self._dead(observation.source, "internal",
                               f"the normalizer failed on this record ({type(exc).__name__}: {str(exc)[:200]}); please report it",
                               document=ids)
                )
                continue
            result.observations.append(observation)
        return result

    def _validate_one(self, observation: Observation) -> list[Any]:
        try:
            return self.shapes.validate(observation.graph)
        except Exception as exc:  # noqa: BLE001
            from stream.shapes import Violation  # noqa: PLC0415

            return [Violation(observation.graph.primary.iri or "", "", "internal", f"validator failed: {type(exc).__name__}")]


def _may_repeat_keys(value: bytes, document: Any) -> bool:
    """False when ``document``, orjson's reading of ``value``, kept every key ``value`` holds.

    orjson keeps the last of repeated keys without a word. In JSON the only colons outside
    strings end keys, so ``value`` holds one colon per key plus those written inside its
    strings; orjson's own serialization of ``document`` holds one per key kept plus those of
    the strings kept (it writes colons as they are). Unless an escape (``\\u003a``) wrote a
    colon, the two counts differ exactly when a key was dropped. ~2 µs for a 1 KB event, where
    parsing again with ``object_pairs_hook`` takes 8 to 15; True sends the record there.
    """
    if b"\\u003" in value:  # \u003a or \u003A, or a digit or sign written alike: look closely
        return True
    try:
        written = orjson.dumps(document)
    except TypeError:  # nested deeper than orjson writes (254 levels; it reads 1024)
        return True
    return value.count(b":") != written.count(b":")


class _Repeated(dict):  # type: ignore[type-arg]
    """A JSON object that had a key more than once (json's ``object_pairs_hook``)."""

    __slots__ = ("key",)

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                return _Repeated(pairs, key)
            seen.add(key)
    return out


def _repeated_key(document: Any) -> str | None:
    """The path (as the contract writes paths) of the first key repeated in ``document``."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), document)]
    while stack:
        segments, item = stack.pop()
        if isinstance(item, _Repeated):
            return format_path((*segments, item.key))
        if isinstance(item, dict):
            stack.extend(((*segments, k), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, list):
            stack.extend(((*segments, i), v) for i, v in reversed(list(enumerate(item))))
    return None


_BYTE_ORDER_MARKS = (  # UTF-32's first: its little-endian mark begins with UTF-16's
    (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF8, "UTF-8"), (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _foreign_encoding(value: bytes) -> str | None:
    """What makes ``value`` other than UTF-8 without a byte-order mark, or None."""
    for mark, name in _BYTE_ORDER_MARKS:
        if value.startswith(mark):
            return f"starts with a {name} byte-order mark"
    guessed = json.detect_encoding(value)  # from where NUL bytes sit among the first four
    if guessed != "utf-8":
        return f"looks like {guessed.upper()} text (NUL bytes between its characters)"
    return None


def _lone_surrogate(value: Any, path: str = "$") -> str | None:
    """The JSON path of the first key or string holding a lone surrogate, else None."""
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return where
        elif isinstance(item, dict):
            for key, child in reversed(list(item.items())):
                bad = _lone_surrogate(key, f"{where} (a key)")
                if bad is not None:
                    return bad
                stack.append((f"{where}.{key}", child))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


def normalize_record(record: SourceRecord, normalizer: Normalizer) -> Observation | DeadLetter:
    """One record through every stage (convenience for tests and tools)."""
    result = normalizer.process([record])
    if result.observations:
        return result.observations[0]
    return result.dead_letters[0]


def _stage_of(issues: Sequence[Any]) -> str:
    for issue in issues:
        message = issue.message
        if "not a known unit" in message or "cannot be converted" in message or issue.path.endswith(".unit"):
            return "unit"
    for issue in issues:
        if "term table" in issue.message or "is not a known" in issue.message:
            return "code"
    return "schema"


def _summary(issues: Sequence[Issue], limit: int = 5) -> str:
    shown = "; ".join(i.message for i in issues[:limit])
    more = f" (and {len(issues) - limit} more)" if len(issues) > limit else ""
    return shown + more
