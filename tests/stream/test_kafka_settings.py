"""Settings, topic names and small helpers: no broker needed."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta, timezone

import pytest

from stream import KafkaSettings, Record, Topics, ensure_broker, next_offsets, record_headers, timestamp_ms

SECRET = "s3cr3t-not-for-logs"


def secure_env() -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9093,kafka-2:9093",
        "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "KAFKA_SASL_MECHANISM": "scram-sha-512",
        "KAFKA_SASL_USERNAME": "twin-worker",
        "KAFKA_SASL_PASSWORD": SECRET,
        "KAFKA_SSL_CA_LOCATION": "/etc/kafka/ca.pem",
        "ONCOTWIN_TOPIC_PREFIX": "site-a",
        "ONCOTWIN_TOPIC_PARTITIONS": "12",
        "ONCOTWIN_TOPIC_REPLICATION": "3",
        "ONCOTWIN_CONSUMER_GROUP": "twins",
    }


def test_defaults_from_empty_env_select_the_embedded_broker_and_fast_group_timings() -> None:
    settings = KafkaSettings.from_env({})
    assert settings.embedded
    assert settings.topic_prefix == "oncotwin"
    assert (settings.topic_partitions, settings.topic_replication) == (6, 1)
    # tansu forms a group only after ~session.timeout/2: the default must stay short.
    assert settings.session_timeout_ms <= 10_000
    assert settings.heartbeat_interval_ms < settings.session_timeout_ms
    with pytest.raises(ValueError, match="ensure_broker"):
        settings.client_config()


def test_env_is_parsed_and_passed_to_confluent_kafka() -> None:
    settings = KafkaSettings.from_env(secure_env())
    assert not settings.embedded
    assert (settings.topic_prefix, settings.topic_partitions, settings.topic_replication) == ("site-a", 12, 3)
    config = settings.client_config()
    assert config["bootstrap.servers"] == "kafka-1:9093,kafka-2:9093"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "twin-worker"
    assert config["sasl.password"] == SECRET
    assert config["ssl.ca.location"] == "/etc/kafka/ca.pem"
    assert "ssl.certificate.location" not in config

    producer = settings.producer_config()
    assert producer["enable.idempotence"] is True and producer["acks"] == "all"
    consumer = settings.consumer_config()
    assert consumer["group.id"] == "twins"
    assert consumer["enable.auto.commit"] is False
    assert consumer["auto.offset.reset"] == "earliest"
    assert settings.consumer_config("replay-1")["group.id"] == "replay-1"


def test_compression_codec_reaches_librdkafka_and_faust() -> None:
    default = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "a:9092"})
    assert default.producer_config()["compression.type"] == "lz4"
    assert default.faust_config()["producer_compression_type"] == "lz4"
    off = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "a:9092", "KAFKA_COMPRESSION_TYPE": "NONE"})
    assert off.producer_config()["compression.type"] == "none"
    assert off.faust_config()["producer_compression_type"] is None


def test_plaintext_sends_no_credentials_even_if_some_are_set() -> None:
    env = secure_env() | {"KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
    config = KafkaSettings.from_env(env).client_config()
    assert not any(key.startswith(("sasl.", "ssl.")) for key in config)


def test_secrets_are_masked_in_repr_str_and_table() -> None:
    settings = KafkaSettings.from_env(secure_env())
    for text in (repr(settings), str(settings), f"{settings}", str(settings.as_table()), str(settings.redacted())):
        assert SECRET not in text
        assert "***" in text
    table = dict((name, value) for name, value, _help in settings.as_table())
    assert table["KAFKA_SASL_USERNAME"] == "twin-worker"
    assert table["ONCOTWIN_TOPIC_PARTITIONS"] == "12"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ONCOTWIN_TOPIC_PARTITIONS", "six", "integer"),
        ("ONCOTWIN_TOPIC_PARTITIONS", "0", ">= 1"),
        ("KAFKA_SECURITY_PROTOCOL", "TLS", "PLAINTEXT, SSL"),
        ("KAFKA_HEARTBEAT_INTERVAL_MS", "9000", "below"),
        ("KAFKA_COMPRESSION_TYPE", "brotli", "none, gzip, snappy, lz4, zstd"),
    ],
)
def test_bad_env_values_are_refused_with_the_variable_named(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KafkaSettings.from_env({name: value})


def test_faust_config_carries_broker_urls_timings_and_credentials() -> None:
    settings = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "a:9092,b:9092"})
    config = settings.faust_config()
    assert config["broker"] == ["kafka://a:9092", "kafka://b:9092"]
    assert config["broker_session_timeout"] == 6.0
    assert config["broker_heartbeat_interval"] == 1.0
    assert "broker_credentials" not in config

    env = secure_env() | {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN"}
    credentials = KafkaSettings.from_env(env).faust_config()["broker_credentials"]
    assert credentials.username == "twin-worker" and credentials.password == SECRET
    assert SECRET not in repr(credentials)

    import faust  # noqa: PLC0415

    app = faust.App("oncotwin-settings-test", **config)
    assert app.conf.broker_session_timeout == 6.0
    assert [str(url) for url in app.conf.broker] == ["kafka://a:9092", "kafka://b:9092"]


def test_importing_stream_does_not_import_faust() -> None:
    import subprocess  # noqa: PLC0415

    code = "import sys, stream; print('faust' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_embedded_broker_refuses_security_settings_without_servers() -> None:
    env = secure_env() | {"KAFKA_BOOTSTRAP_SERVERS": ""}
    with pytest.raises(ValueError, match="PLAINTEXT only"):
        ensure_broker(KafkaSettings.from_env(env))


def test_configured_servers_start_no_broker() -> None:
    settings = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "kafka:9092"})
    assert ensure_broker(settings) == (settings, None)


def test_topic_names_follow_the_design() -> None:
    topics = Topics("oncotwin")
    assert topics.all() == (
        "oncotwin.events.imaging.v1",
        "oncotwin.events.lab.v1",
        "oncotwin.events.ctdna.v1",
        "oncotwin.events.treatment.v1",
        "oncotwin.observations.v1",
        "oncotwin.forecasts.v1",
        "oncotwin.deadletter.v1",
    )
    assert topics.event_topic("ctdna") == "oncotwin.events.ctdna.v1"
    assert topics.kind_of("oncotwin.events.lab.v1") == "lab"
    assert topics.kind_of(topics.forecasts) is None
    assert Topics.from_settings(KafkaSettings(topic_prefix="site-b")).deadletter == "site-b.deadletter.v1"
    with pytest.raises(ValueError, match="unknown event kind"):
        topics.event_topic("pathology")
    with pytest.raises(ValueError, match="illegal"):
        Topics("bad prefix/with space")


def test_record_headers_and_event_time() -> None:
    headers = record_headers(schema_version=2, event_id="e-1", source_topic="x")
    assert headers == {
        "content-type": "application/json",
        "schema-version": "2",
        "event-id": "e-1",
        "source-topic": "x",
    }
    moment = datetime(2025, 3, 4, 9, 30, tzinfo=timezone(timedelta(hours=1)))
    assert timestamp_ms(moment) == 1741077000000
    with pytest.raises(ValueError, match="time zone"):
        timestamp_ms(datetime(2025, 3, 4, 9, 30))


def test_next_offsets_is_one_past_the_highest_offset_per_partition() -> None:
    records = [Record("t", 0, 4, "k", b""), Record("t", 1, 7, "k", b""), Record("t", 0, 2, "k", b"")]
    assert next_offsets(records) == {("t", 0): 5, ("t", 1): 8}
