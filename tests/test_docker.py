"""docker/ cannot run here (no Docker engine): check what can be checked without one."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.main import get_command

from oncotwin.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_kraft_kafka_topics_normalizer_and_two_workers():
    services = _compose()["services"]
    assert set(services) >= {"kafka", "topics", "normalizer", "worker"}
    kafka = services["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "zookeeper" not in COMPOSE.read_text().lower()
    assert services["worker"]["deploy"]["replicas"] == 2
    for name in ("topics", "normalizer", "worker"):
        assert services[name]["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    # the twins follow partitions from worker to worker (on any host) through one bucket
    assert services["worker"]["environment"]["ONCOTWIN_STATE_URL"].startswith("s3://")
    assert "endpoint=http://minio:9000" in services["worker"]["environment"]["ONCOTWIN_STATE_URL"]
    assert any(v.startswith("twin-state:") for v in services["minio"]["volumes"])
    assert set(services["worker"]["depends_on"]) == {"topics", "minio"}
    assert any(v.startswith("rdf-store:") for v in services["normalizer"]["volumes"])


def test_every_service_command_is_a_real_cli_command():
    commands = set(get_command(app).commands)
    for name, service in _compose()["services"].items():
        if "command" in service and name not in ("kafka", "minio"):
            assert service["command"][0] in commands, f"{name}: {service['command']}"


def test_image_installs_with_the_readme_bootstrap_and_copies_every_package():
    text = DOCKERFILE.read_text()
    assert "scripts/bootstrap" in text
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/bootstrap" in makefile
    copied = set(re.findall(r"^COPY (\w+) ", text, flags=re.M))
    packages = {"schemas", "models", "assimilation", "stream", "oncotwin"}
    assert packages <= copied
    assert "ARG BASE_IMAGE=" in text and "torch==2.13.0" in text
