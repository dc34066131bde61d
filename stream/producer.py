"""An idempotent producer whose failures cannot go unnoticed.

confluent-kafka reports delivery asynchronously through callbacks that only run inside
``poll``/``flush``; a caller that never looks would lose records silently. ``EventProducer``
polls on every send, keeps every failure, and makes ``flush`` raise ``DeliveryError`` for
anything not acknowledged by the brokers.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping
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


@dataclass(frozen=True)
class DeliveryFailure:
    topic: str
    key: str | None
    error: str


class DeliveryError(Exception):
    """Records that the brokers did not acknowledge (failed, or still queued at the deadline)."""

    def __init__(self, failures: list[DeliveryFailure], *, total_failed: int | None = None) -> None:
        self.failures = failures
        self.total_failed = len(failures) if total_failed is None else total_failed
        shown = "; ".join(f"{f.topic} key={f.key!r}: {f.error}" for f in failures[:10])
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
        self._pending: dict[int, tuple[str, str | None]] = {}
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
    ) -> None:
        """Queue one record; delivery is confirmed (or reported) by ``flush``.

        Raises ``DeliveryError`` at once for a record the client refuses outright (e.g.
        larger than message.max.bytes); the error also lists failures that callbacks have
        reported since the last flush.
        """
        if timestamp_ms is not None and timestamp_ms <= 0:
            # librdkafka reads 0 as "now": an explicit event time must be positive.
            raise ValueError(f"timestamp_ms must be positive, not {timestamp_ms}")
        record_id = self._next_id
        self._next_id += 1
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

        deadline = time.monotonic() + self.send_timeout
        while True:
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                # Local queue full: serve delivery reports to make room, up to send_timeout.
                if time.monotonic() >= deadline:
                    self._fail(topic, key, "local queue full (queue.buffering.max.messages)")
                    self._raise_failures()
                self._producer.poll(0.05)
            except KafkaException as exc:
                self._fail(topic, key, _describe(exc.args[0]))
                self._raise_failures()
        self._pending[record_id] = (topic, key)
        # Serving callbacks on every send keeps the failure list current and memory flat.
        self._producer.poll(0)

    def poll(self, timeout: float = 0.0) -> int:
        """Serve delivery callbacks; returns how many fired."""
        return self._producer.poll(timeout)

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until every queued record is acknowledged; raise ``DeliveryError`` otherwise."""
        self._producer.flush(timeout)
        if self._pending:
            for topic, key in list(self._pending.values())[:_MAX_FAILURES_KEPT]:
                self._failures.append(DeliveryFailure(topic, key, f"not acknowledged within {timeout:g}s"))
            self._unreported_failures += len(self._pending)
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
        topic, key = self._pending.pop(record_id, (message.topic() or "?", None))
        if error is None:
            self.sent += 1
        else:
            self._fail(topic, key, _describe(error))

    def _on_client_error(self, error: KafkaError) -> None:
        # Transport errors are retried by librdkafka and surface as delivery failures when
        # they outlast delivery.timeout.ms; only fatal ones (idempotence broken) end the producer.
        if error.fatal():
            self.fatal_error = error
            log.error("fatal producer error: %s", error)
        else:
            log.debug("producer client error (retried): %s", error)

    def _fail(self, topic: str, key: str | None, error: str) -> None:
        self.failed += 1
        self._unreported_failures += 1
        if len(self._failures) < _MAX_FAILURES_KEPT:
            self._failures.append(DeliveryFailure(topic, key, error))

    def _raise_failures(self) -> None:
        if not self._unreported_failures:
            return
        failures, total = self._failures, self._unreported_failures
        self._failures, self._unreported_failures = [], 0
        raise DeliveryError(failures, total_failed=total)


def _describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"
