"""Everything Kafka: settings, topics, the embedded broker, producer and consumer wrappers.

Kept light on purpose: importing ``stream`` pulls in confluent-kafka only. Modules that
need faust (the normalizer agents) are imported by name, never from here.
"""

from stream.broker import BrokerError, EmbeddedBroker, ensure_broker, find_tansu
from stream.consumer import (
    BatchConsumer,
    ConsumerError,
    Record,
    next_offsets,
    offsets_for_time,
    read_all,
)
from stream.producer import (
    DeliveryError,
    DeliveryFailure,
    EventProducer,
    record_headers,
    timestamp_ms,
)
from stream.settings import KafkaSettings
from stream.topics import EVENT_KINDS, TopicError, Topics, ensure_topics

__all__ = [
    "EVENT_KINDS",
    "BatchConsumer",
    "BrokerError",
    "ConsumerError",
    "DeliveryError",
    "DeliveryFailure",
    "EmbeddedBroker",
    "EventProducer",
    "KafkaSettings",
    "Record",
    "TopicError",
    "Topics",
    "ensure_broker",
    "ensure_topics",
    "find_tansu",
    "next_offsets",
    "offsets_for_time",
    "read_all",
    "record_headers",
    "timestamp_ms",
]
