"""Topic names (DESIGN §1) and their idempotent creation."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from stream.settings import KafkaSettings

log = logging.getLogger(__name__)

EVENT_KINDS: tuple[str, ...] = ("imaging", "lab", "ctdna", "treatment")

# Kafka's own rule for topic names (legal characters, at most 249 of them).
_LEGAL_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class TopicError(RuntimeError):
    """A topic could not be created or did not show up in the cluster metadata."""


@dataclass(frozen=True)
class Topics:
    """Every topic name of the service, derived from one prefix."""

    prefix: str = "oncotwin"
    imaging: str = field(init=False)
    lab: str = field(init=False)
    ctdna: str = field(init=False)
    treatment: str = field(init=False)
    observations: str = field(init=False)
    forecasts: str = field(init=False)
    deadletter: str = field(init=False)

    def __post_init__(self) -> None:
        def name(suffix: str) -> str:
            return f"{self.prefix}.{suffix}" if self.prefix else suffix

        names = {kind: name(f"events.{kind}.v1") for kind in EVENT_KINDS}
        names.update(
            observations=name("observations.v1"),
            forecasts=name("forecasts.v1"),
            deadletter=name("deadletter.v1"),
        )
        for attr, topic in names.items():
            if not _LEGAL_TOPIC.match(topic):
                raise ValueError(f"illegal Kafka topic name {topic!r} (prefix {self.prefix!r})")
            object.__setattr__(self, attr, topic)

    @classmethod
    def from_settings(cls, settings: KafkaSettings) -> Topics:
        return cls(settings.topic_prefix)

    def event_topic(self, kind: str) -> str:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {', '.join(EVENT_KINDS)}")
        return getattr(self, kind)

    def events(self) -> tuple[str, ...]:
        return tuple(getattr(self, kind) for kind in EVENT_KINDS)

    def all(self) -> tuple[str, ...]:
        return (*self.events(), self.observations, self.forecasts, self.deadletter)

    def kind_of(self, topic: str) -> str | None:
        """The event kind an event topic carries, None for the other topics."""
        for kind in EVENT_KINDS:
            if getattr(self, kind) == topic:
                return kind
        return None


def ensure_topics(
    settings: KafkaSettings,
    topics: Topics | Iterable[str] | None = None,
    partitions: int | None = None,
    replication: int | None = None,
    *,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet and wait until the metadata shows them all.

    Returns the names this call created; a topic that exists already (or that another
    process creates at the same moment) is fine. Partition counts of existing topics are
    left alone: growing them is an operator's decision (and tansu has no CreatePartitions).
    """
    if topics is None:
        topics = Topics.from_settings(settings)
    names = list(topics.all()) if isinstance(topics, Topics) else list(dict.fromkeys(topics))
    partitions = settings.topic_partitions if partitions is None else partitions
    replication = settings.topic_replication if replication is None else replication
    deadline = time.monotonic() + timeout
    admin = AdminClient(settings.client_config())

    existing = admin.list_topics(timeout=_left(deadline)).topics
    missing = [name for name in names if name not in existing]
    for name in names:
        if name in existing and len(existing[name].partitions) < partitions:
            log.warning(
                "topic %s has %d partitions, fewer than the %d configured; not changing it",
                name, len(existing[name].partitions), partitions,
            )

    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=replication) for name in missing],
            operation_timeout=min(timeout, 30.0),
            request_timeout=min(timeout, 30.0),
        )
        for name, future in futures.items():
            try:
                future.result(timeout=_left(deadline))
                created.append(name)
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise TopicError(f"cannot create topic {name}: {error.str()}") from exc

    _wait_for_metadata(admin, names, deadline)
    if created:
        log.info("created topics %s (%d partitions, replication %d)", created, partitions, replication)
    return created


def _wait_for_metadata(admin: AdminClient, names: list[str], deadline: float) -> None:
    # Creation is acknowledged by the controller before every broker serves the topic; a
    # producer started right away would otherwise meet UNKNOWN_TOPIC_OR_PART.
    pending = set(names)
    while True:
        metadata = admin.list_topics(timeout=_left(deadline))
        for name in list(pending):
            topic = metadata.topics.get(name)
            if topic is not None and topic.error is None and topic.partitions and all(
                p.leader >= 0 for p in topic.partitions.values()
            ):
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise TopicError(f"topics not visible in the cluster metadata in time: {sorted(pending)}")
        time.sleep(0.1)


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())
