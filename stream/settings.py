"""Kafka connection and topic settings read from the environment.

One frozen dataclass feeds every client we build: confluent-kafka producers, consumers and
admin clients (``client_config`` and friends) and faust apps (``faust_config``). An empty
``KAFKA_BOOTSTRAP_SERVERS`` means "start the embedded broker" (see ``stream.broker``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

# Every codec Kafka defines; our clients read all of them (aiokafka through cramjam).
COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")

# name -> (default, help). The single source for `oncotwin settings` and the README table,
# in the same shape as oncotwin.settings.ENV_VARS.
ENV_VARS: dict[str, tuple[str, str]] = {
    "KAFKA_BOOTSTRAP_SERVERS": ("", "host:port[,host:port]; empty starts the embedded tansu broker"),
    "KAFKA_SECURITY_PROTOCOL": ("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    "KAFKA_SASL_MECHANISM": ("", "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (with a SASL_* protocol)"),
    "KAFKA_SASL_USERNAME": ("", "SASL user name"),
    "KAFKA_SASL_PASSWORD": ("", "SASL password (never printed)"),
    "KAFKA_SSL_CA_LOCATION": ("", "PEM file of the CA that signed the brokers' certificates"),
    "KAFKA_SSL_CERTIFICATE_LOCATION": ("", "client certificate (PEM) for mutual TLS"),
    "KAFKA_SSL_KEY_LOCATION": ("", "client private key (PEM) for mutual TLS"),
    "KAFKA_CLIENT_ID": ("oncotwin", "client.id reported to the brokers"),
    "KAFKA_SESSION_TIMEOUT_MS": (
        "6000",
        "consumer group session timeout; tansu forms a group only after about half of it",
    ),
    "KAFKA_HEARTBEAT_INTERVAL_MS": ("1000", "consumer heartbeat interval (well below the session timeout)"),
    "KAFKA_FETCH_WAIT_MAX_MS": ("50", "longest a fetch waits for data: low values keep latency low"),
    "KAFKA_DELIVERY_TIMEOUT_MS": ("120000", "how long the producer retries a record before reporting it undelivered"),
    "KAFKA_COMPRESSION_TYPE": ("lz4", f"codec of the record batches we produce: {', '.join(COMPRESSION_TYPES)}"),
    "ONCOTWIN_TOPIC_PREFIX": ("oncotwin", "prefix of every topic name (oncotwin.events.lab.v1 ...)"),
    "ONCOTWIN_TOPIC_PARTITIONS": ("6", "partitions of topics we create"),
    "ONCOTWIN_TOPIC_REPLICATION": ("1", "replication factor of topics we create"),
    "ONCOTWIN_CONSUMER_GROUP": ("oncotwin", "consumer group of the workers"),
}

# dataclass field -> env var (every field has one).
_FIELD_ENV: dict[str, str] = {
    "bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "security_protocol": "KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "KAFKA_SASL_MECHANISM",
    "sasl_username": "KAFKA_SASL_USERNAME",
    "sasl_password": "KAFKA_SASL_PASSWORD",
    "ssl_ca_location": "KAFKA_SSL_CA_LOCATION",
    "ssl_certificate_location": "KAFKA_SSL_CERTIFICATE_LOCATION",
    "ssl_key_location": "KAFKA_SSL_KEY_LOCATION",
    "client_id": "KAFKA_CLIENT_ID",
    "session_timeout_ms": "KAFKA_SESSION_TIMEOUT_MS",
    "heartbeat_interval_ms": "KAFKA_HEARTBEAT_INTERVAL_MS",
    "fetch_wait_max_ms": "KAFKA_FETCH_WAIT_MAX_MS",
    "delivery_timeout_ms": "KAFKA_DELIVERY_TIMEOUT_MS",
    "compression_type": "KAFKA_COMPRESSION_TYPE",
    "topic_prefix": "ONCOTWIN_TOPIC_PREFIX",
    "topic_partitions": "ONCOTWIN_TOPIC_PARTITIONS",
    "topic_replication": "ONCOTWIN_TOPIC_REPLICATION",
    "consumer_group": "ONCOTWIN_CONSUMER_GROUP",
}

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MASK = "***"


def _int_env(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env.get(name, "") or ENV_VARS[name][0]
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, not {raw!r}") from exc
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {value}")
    return value


@dataclass(frozen=True, repr=False)
class KafkaSettings:
    bootstrap_servers: str = ""
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    client_id: str = "oncotwin"
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    fetch_wait_max_ms: int = 50
    delivery_timeout_ms: int = 120_000
    compression_type: str = "lz4"
    topic_prefix: str = "oncotwin"
    topic_partitions: int = 6
    topic_replication: int = 1
    consumer_group: str = "oncotwin"

    def __post_init__(self) -> None:
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(SECURITY_PROTOCOLS)}, "
                f"not {self.security_protocol!r}"
            )
        if self.compression_type not in COMPRESSION_TYPES:
            raise ValueError(
                f"KAFKA_COMPRESSION_TYPE must be one of {', '.join(COMPRESSION_TYPES)}, not {self.compression_type!r}"
            )
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            # The broker would expire the member between two heartbeats.
            raise ValueError(
                f"KAFKA_HEARTBEAT_INTERVAL_MS ({self.heartbeat_interval_ms}) must be below "
                f"KAFKA_SESSION_TIMEOUT_MS ({self.session_timeout_ms})"
            )
        if self.topic_partitions < 1 or self.topic_replication < 1:
            raise ValueError("topic partitions and replication must be >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> KafkaSettings:
        env = environ

        def get(name: str) -> str:
            return (env.get(name, "") or ENV_VARS[name][0]).strip()

        return cls(
            bootstrap_servers=get("KAFKA_BOOTSTRAP_SERVERS"),
            security_protocol=get("KAFKA_SECURITY_PROTOCOL").upper(),
            sasl_mechanism=get("KAFKA_SASL_MECHANISM").upper(),
            sasl_username=get("KAFKA_SASL_USERNAME"),
            # Passwords may legitimately start or end with blanks: no strip.
            sasl_password=env.get("KAFKA_SASL_PASSWORD", ""),
            ssl_ca_location=get("KAFKA_SSL_CA_LOCATION"),
            ssl_certificate_location=get("KAFKA_SSL_CERTIFICATE_LOCATION"),
            ssl_key_location=get("KAFKA_SSL_KEY_LOCATION"),
            client_id=get("KAFKA_CLIENT_ID"),
            session_timeout_ms=_int_env(env, "KAFKA_SESSION_TIMEOUT_MS", 1),
            heartbeat_interval_ms=_int_env(env, "KAFKA_HEARTBEAT_INTERVAL_MS", 1),
            fetch_wait_max_ms=_int_env(env, "KAFKA_FETCH_WAIT_MAX_MS", 0),
            delivery_timeout_ms=_int_env(env, "KAFKA_DELIVERY_TIMEOUT_MS", 1),
            compression_type=get("KAFKA_COMPRESSION_TYPE").lower(),
            topic_prefix=get("ONCOTWIN_TOPIC_PREFIX"),
            topic_partitions=_int_env(env, "ONCOTWIN_TOPIC_PARTITIONS", 1),
            topic_replication=_int_env(env, "ONCOTWIN_TOPIC_REPLICATION", 1),
            consumer_group=get("ONCOTWIN_CONSUMER_GROUP"),
        )

    # -- derived -----------------------------------------------------------------------

    @property
    def embedded(self) -> bool:
        """True when no bootstrap servers are configured: the embedded broker is wanted."""
        return not self.bootstrap_servers

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def with_bootstrap(self, servers: str) -> KafkaSettings:
        return replace(self, bootstrap_servers=servers)

    def with_topic_prefix(self, prefix: str) -> KafkaSettings:
        return replace(self, topic_prefix=prefix)

    # -- confluent-kafka ---------------------------------------------------------------

    def client_config(self) -> dict[str, Any]:
        """Keys every confluent-kafka client (producer, consumer, admin) shares."""
        if not self.bootstrap_servers:
            # Reaching a client with no servers means ensure_broker() was skipped; librdkafka
            # would otherwise retry forever against nothing.
            raise ValueError("no KAFKA_BOOTSTRAP_SERVERS: call stream.ensure_broker(settings) first")
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism if self.uses_sasl else "",
            "sasl.username": self.sasl_username if self.uses_sasl else "",
            "sasl.password": self.sasl_password if self.uses_sasl else "",
            "ssl.ca.location": self.ssl_ca_location if self.uses_ssl else "",
            "ssl.certificate.location": self.ssl_certificate_location if self.uses_ssl else "",
            "ssl.key.location": self.ssl_key_location if self.uses_ssl else "",
        }
        config.update({k: v for k, v in optional.items() if v})
        return config

    def producer_config(self) -> dict[str, Any]:
        config = self.client_config()
        config.update(
            {
                # Idempotence keeps per-partition order and drops the duplicates that
                # retries would create; it implies acks=all and bounded in-flight requests.
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                # JSON-LD compresses several-fold: less for the brokers to store and serve.
                "compression.type": self.compression_type,
                "delivery.timeout.ms": self.delivery_timeout_ms,
            }
        )
        return config

    def consumer_config(self, group_id: str | None = None) -> dict[str, Any]:
        config = self.client_config()
        config.update(
            {
                "group.id": group_id or self.consumer_group,
                # Offsets are committed by the caller once its work is durable (DESIGN §6).
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self.session_timeout_ms,
                "heartbeat.interval.ms": self.heartbeat_interval_ms,
                "fetch.wait.max.ms": self.fetch_wait_max_ms,
            }
        )
        return config

    # -- faust / aiokafka --------------------------------------------------------------

    def faust_config(self) -> dict[str, Any]:
        """Keyword arguments for ``faust.App`` (broker URL, credentials, group timings).

        faust is imported only when credentials are needed, so that plain settings stay
        importable without it.
        """
        if not self.bootstrap_servers:
            raise ValueError("no KAFKA_BOOTSTRAP_SERVERS: call stream.ensure_broker(settings) first")
        config: dict[str, Any] = {
            "broker": [f"kafka://{host.strip()}" for host in self.bootstrap_servers.split(",") if host.strip()],
            "broker_client_id": self.client_id,
            "broker_session_timeout": self.session_timeout_ms / 1000,
            "broker_heartbeat_interval": self.heartbeat_interval_ms / 1000,
            "broker_max_poll_interval": max(300.0, self.session_timeout_ms / 1000),
            "consumer_auto_offset_reset": "earliest",
            "producer_compression_type": None if self.compression_type == "none" else self.compression_type,
        }
        credentials = self._faust_credentials()
        if credentials is not None:
            config["broker_credentials"] = credentials
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        """An SSL context built from the KAFKA_SSL_* files, for clients that want one."""
        if not self.uses_ssl:
            return None
        context = ssl.create_default_context(
            purpose=ssl.Purpose.SERVER_AUTH, cafile=self.ssl_ca_location or None
        )
        if self.ssl_certificate_location:
            context.load_cert_chain(self.ssl_certificate_location, self.ssl_key_location or None)
        return context

    def _faust_credentials(self) -> Any:
        if self.security_protocol == "PLAINTEXT":
            return None
        import faust  # noqa: PLC0415  (lazy: see faust_config)

        if self.uses_sasl:
            return faust.SASLCredentials(
                username=self.sasl_username or None,
                password=self.sasl_password or None,
                mechanism=self.sasl_mechanism or None,
                ssl_context=self.ssl_context(),
            )
        return faust.SSLCredentials(self.ssl_context())

    # -- display -----------------------------------------------------------------------

    def redacted(self) -> dict[str, Any]:
        """Field values with the password masked: what may go to logs and screens."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if values["sasl_password"]:
            values["sasl_password"] = _MASK
        return values

    def as_table(self) -> list[tuple[str, str, str]]:
        """(env var, effective value, help) rows, secrets masked."""
        values = self.redacted()
        return [(env, str(values[name]), ENV_VARS[env][1]) for name, env in _FIELD_ENV.items()]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"KafkaSettings({inner})"

    __str__ = __repr__
