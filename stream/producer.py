"""An idempotent producer whose failures cannot go unnoticed.

confluent-kafka reports delivery asynchronously through callbacks that only run inside
``poll``/``flush``; a caller that never looks would lose records silently. ``EventProducer``
polls on every send, keeps every failure, and makes ``flush`` raise ``DeliveryError`` for
anything not acknowledged by the brokers. ``deliver`` instead tells the outcome of each record
of a batch, and whether a failure is the record's own (too large, a timestamp Kafka cannot
carry: sending it again cannot succeed) or the cluster's (worth retrying).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from stream.settings import KafkaSettings

log = logging.getLogger(__name__)

HEADER_CONTENT_TYPE = "content-type"
HEADER_SCHEMA_VERSION = "schema-version"
CONTENT_TYPE_JSON = "application/json"

# Failures kept for the DeliveryError message; the counters stay exact beyond it.
_MAX_FAILURES_KEPT = 1000

# Errors that say the record itself is refused: sent again, it fails again. Any other error
# (timeouts, brokers down, an unknown topic, authorization, a fatal producer error) is the
# cluster's or the configuration's, would refuse every record alike, and is worth retrying.
PERMANENT_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,  # larger than message.max.bytes (client) or the topic's limit (broker)
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_TIMESTAMP,  # outside the topic's message.timestamp.*.max.ms
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
    KafkaError._INVALID_ARG,
})


@dataclass(frozen=True)
class DeliveryFailure:
    """One record not acknowledged. ``code``: the KafkaError code, if any; ``permanent``: the
    record itself is refused (see PERMANENT_ERRORS; also a key, header or timestamp the client
    cannot encode), so sending it again cannot succeed."""

    topic: str
    key: str | None
    error: str
    code: int | None = None
    permanent: bool = False


@dataclass(frozen=True)
class Outgoing:
    """One record for ``EventProducer.deliver``."""

    topic: str
    key: str | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: Mapping[str, str] | None = None


Outcome = Callable[[DeliveryFailure | None], None]
_WAITING = object()


class DeliveryError(Exception):
    """Records that the brokers did not acknowledge (failed, or still queued at the deadline).

    Its message names topics and errors, never keys: a key is a patient pseudonym, and this
    message goes to logs."""

    def __init__(self, failures: list[DeliveryFailure], *, total_failed: int | None = None) -> None:
        self.failures = failures
        self.total_failed = len(failures) if total_failed is None else total_failed
        shown = "; ".join(f"{f.topic}: {f.error}" for f in failures[:10])
        more = f" (+{self.total_failed - 10} more)" if self.total_failed > 10 else ""
        super().__init__(f"{self.total_failed} record(s) not delivered: {shown}{more}")


def record_headers(
    content_type: str = CONTENT_TYPE_JSON, schema_version: str | int = "1", **extra: object
) -> dict[str, str]:
    """Standard record headers; ``extra`` keyword names become header names with '-' for '_'.

    >>> record_headers(schema_version=1, source_topic="a")
    {'content-type': 'application/json', 'schema-version': '1', 'source-topic': 'a'}
    """
    headers = {HEADER_CONTENT_TYPE: content_type, HEADER_SCHEMA_VERSION: str(schema_version)}
    headers.update({name.replace("_", "-"): str(value) for name, value in extra.items()})
    return headers


def timestamp_ms(moment: datetime) -> int:
    """Kafka record timestamp (ms since the epoch) of a zone-aware datetime."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        # A naive time would be read in the machine's zone: event times must carry theirs.
        raise ValueError(f"event time {moment.isoformat()} has no time zone")
    return int(round(moment.timestamp() * 1000))


class EventProducer:
    """Wraps ``confluent_kafka.Producer`` with idempotence, acks=all and checked delivery."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        config_overrides: Mapping[str, Any] | None = None,
        send_timeout: float = 30.0,
    ) -> None:
        config = settings.producer_config()
        config.update(config_overrides or {})
        config.setdefault("error_cb", self._on_client_error)
        self._producer = Producer(config)
        self.send_timeout = send_timeout
        self._next_id = 0
        self._pending: dict[int, tuple[str, str | None, Outcome | None]] = {}
        self._failures: list[DeliveryFailure] = []
        self._unreported_failures = 0
        self.sent = 0  # acknowledged by the brokers
        self.failed = 0  # refused by the client or reported failed by a delivery callback
        self.fatal_error: KafkaError | None = None
        self._closed = False

    # -- sending -----------------------------------------------------------------------

    def send(
        self,
        topic: str,
        key: str | None,
        value: bytes | None,
        *,
        timestamp_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
        partition: int | None = None,
        on_result: Outcome | None = None,
    ) -> None:
        """Queue one record; delivery is confirmed (or reported) by ``flush``.

        Raises ``DeliveryError`` at once for a record the client refuses outright (e.g.
        larger than message.max.bytes); the error also lists failures that callbacks have
        reported since the last flush. With ``on_result``, the record's outcome goes there
        instead (None once acknowledged, else its ``DeliveryFailure``), also when the client
        refuses it outright; ``send`` and ``flush`` then never raise for it.
        """
        record_id = self._next_id
        self._next_id += 1
        try:
            if timestamp_ms is not None and timestamp_ms <= 0:
                # librdkafka reads 0 as "now": an explicit event time must be positive.
                raise ValueError(f"timestamp_ms must be positive, not {timestamp_ms}")
            kwargs: dict[str, Any] = {
                "key": key.encode() if key is not None else None,
                "value": value,
                "on_delivery": functools.partial(self._on_delivery, record_id),
            }
            if timestamp_ms is not None:
                kwargs["timestamp"] = timestamp_ms
            if headers:
                kwargs["headers"] = [(name, text.encode()) for name, text in headers.items()]
            if partition is not None:
                kwargs["partition"] = partition
        except ValueError as exc:  # UnicodeEncodeError too: a lone surrogate in the key or a header
            if on_result is None:
                raise
            code = KafkaError._INVALID_ARG if isinstance(exc, UnicodeError) else KafkaError.INVALID_TIMESTAMP
            # Not the message: a UnicodeEncodeError quotes the record's character.
            self._refuse(topic, key, f"{type(exc).__name__}: a key, header or timestamp the client cannot send",
                         code, True, on_result)
            return

        deadline = time.monotonic() + self.send_timeout
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, up to send_timeout.
                if time.monotonic() >= deadline:
                    self._refuse(topic, key, "local queue full (queue.buffering.max.messages)", None, False, on_result)
                    return
                self._producer.poll(0.05)
            except KafkaException as exc:
                error = exc.args[0]
                self._refuse(topic, key, _describe(error), error.code(), error.code() in PERMANENT_ERRORS, on_result)
                return
            except OverflowError as exc:  # a timestamp beyond 64 bits
                if on_result is None:
                    raise
                self._refuse(topic, key, f"{type(exc).__name__}: {exc}", KafkaError.INVALID_TIMESTAMP, True, on_result)
                return
        self._pending[record_id] = (topic, key, on_result)
        # Serving callbacks on every send keeps the failure list current and memory flat.
        self._producer.poll(0)

    def deliver(
        self,
        records: Sequence[Outgoing],
        *,
        timeout: float = 30.0,
        stop: threading.Event | None = None,
        grace_s: float = 2.0,
    ) -> list[DeliveryFailure | None]:
        """Send ``records`` and wait for the outcome of each: None where the brokers
        acknowledged it, else its ``DeliveryFailure``. Records still unacknowledged after
        ``timeout`` seconds, or ``grace_s`` after ``stop`` is set, fail as not permanent (they
        may yet be delivered, so sending them again can duplicate them). Never raises for these
        records; waiting is ``flush``, which raises ``DeliveryError`` for failures of records
        sent before without ``on_result``."""
        outcomes: list[Any] = [_WAITING] * len(records)
        for i, r in enumerate(records):
            self.send(r.topic, r.key, r.value, timestamp_ms=r.timestamp_ms, headers=r.headers,
                      on_result=functools.partial(outcomes.__setitem__, i))
        deadline = time.monotonic() + timeout
        stopping = False
        while any(o is _WAITING for o in outcomes):
            now = time.monotonic()
            if not stopping and stop is not None and stop.is_set():
                stopping = True
                deadline = min(deadline, now + grace_s)
            if now >= deadline:
                break
            self.flush(min(0.1, deadline - now))  # serves the delivery reports
        waited = f"not acknowledged within {timeout:g}s" if not stopping else "not acknowledged before the shutdown"
        return [DeliveryFailure(r.topic, r.key, waited) if o is _WAITING else o for r, o in zip(records, outcomes)]

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks; returns how many fired."""
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued record is acknowledged; raise ``DeliveryError`` otherwise."""
        self._producer.flush(timeout)
        unseen = [(topic, key) for topic, key, on_result in self._pending.values() if on_result is None]
        if unseen:
            for topic, key in unseen[:_MAX_FAILURES_KEPT]:
                self._failures.append(DeliveryFailure(topic, key, f"not acknowledged within {timeout:g}s"))
            self._unreported_failures += len(unseen)
            # Those records may still be delivered later: they stay pending, and the next
            # flush reports them again if they are still not acknowledged.
        self._raise_failures()

    @property
    def in_flight(self) -> int:
        """Records sent but neither acknowledged nor failed yet."""
        return len(self._pending)

    # -- lifecycle ---------------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Flush (raising ``DeliveryError`` as ``flush`` does), then release the client.

        Records still queued after ``timeout`` are purged first: librdkafka's own close
        would otherwise wait for them up to delivery.timeout.ms.
        """
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            if self._pending:
                self._producer.purge(in_queue=True, in_flight=True)
                self._producer.poll(0)
            self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: still try to deliver what was queued, but let the original
        # exception propagate rather than mask it with a DeliveryError.
        try:
            self.close()
        except DeliveryError as delivery_error:
            log.error("while handling %s: %s", exc_type.__name__, delivery_error)

    # -- callbacks ---------------------------------------------------------------------

    def _on_delivery(self, record_id: int, error: KafkaError | None, message: Message) -> None:
        topic, key, on_result = self._pending.pop(record_id, (message.topic() or "?", None, None))
        if error is None:
            self.sent += 1
            if on_result is not None:
                on_result(None)
        elif on_result is not None:
            self.failed += 1
            on_result(DeliveryFailure(topic, key, _describe(error), error.code(), error.code() in PERMANENT_ERRORS))
        else:
            self._fail(topic, key, _describe(error), error.code())

    def _on_client_error(self, error: KafkaError) -> None:
        # Transport errors are retried by librdkafka and surface as delivery failures when
        # they outlast delivery.timeout.ms; only fatal ones (idempotence broken) end the producer.
        if error.fatal():
            self.fatal_error = error
            log.error("fatal producer error: %s", error)
        else:
            log.debug("producer client error (retried): %s", error)

    def _fail(self, topic: str, key: str | None, error: str, code: int | None = None) -> None:
        self.failed += 1
        self._unreported_failures += 1
        if len(self._failures) < _MAX_FAILURES_KEPT:
            self._failures.append(DeliveryFailure(topic, key, error, code, code in PERMANENT_ERRORS))

    def _refuse(self, topic: str, key: str | None, error: str, code: int | None, permanent: bool,
                on_result: Outcome | None) -> None:
        """A record the client would not even queue: told to ``on_result``, else raised."""
        if on_result is not None:
            self.failed += 1
            on_result(DeliveryFailure(topic, key, error, code, permanent))
            return
        self._fail(topic, key, error, code)
        self._raise_failures()

    def _raise_failures(self) -> None:
        if not self._unreported_failures:
            return
        failures, total = self._failures, self._unreported_failures
        self._failures, self._unreported_failures = [], 0
        raise DeliveryError(failures, total_failed=total)


def _describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"
