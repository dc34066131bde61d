"""The worker's Prometheus metrics and its HTTP endpoint (/metrics and /healthz).

Every worker owns a ``CollectorRegistry`` (not the process-global one), so that several workers
in one process (tests, the embedded demo) keep separate counts and can each serve them.

Consumer lag. The usual definition is high watermark minus committed offset per partition. The
embedded tansu broker answers ListOffsets (``query_watermark_offsets``) with wrong high
watermarks (1 for a partition holding 10 records), while the high watermark that comes with
every fetch response (librdkafka's cached value) is right. So the lag is computed from what the
consumer itself has seen: high = max(cached fetch high watermark, last fetched offset + 1),
lag = high - committed offset (or - the first fetched offset when the group had committed
nothing). A partition not fetched from since it was assigned reports no lag rather than a guess.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

log = logging.getLogger(__name__)

# Processing latencies: milliseconds to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
# Event-time latencies also cover replays of old logs: seconds to years.
EVENT_TIME_BUCKETS = (
    0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0,
    7 * 86400.0, 30 * 86400.0, 365 * 86400.0, 10 * 365 * 86400.0,
)


class WorkerMetrics:
    """Counters, histograms and gauges of one worker, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "oncotwin_worker") -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r, ns = self.registry, namespace
        self.records = Counter("records", "records consumed from the observations topic, counted when their batch is "
                               "done (a batch given up and done again counts once)", registry=r, namespace=ns)
        self.accounted = Counter(
            "records_accounted", "records of the batches done, each as exactly one of: observation (applied, pending, "
            "ignored or unsupported), dead_letter, duplicate (an event applied before, or twice in a batch); they sum "
            "to records", ["outcome"], registry=r, namespace=ns,
        )
        for outcome in ("observation", "dead_letter", "duplicate"):
            self.accounted.labels(outcome)  # shown (at 0) before the first of each
        self.events = Counter(
            "events", "observations by kind and outcome (applied, skipped: already applied, pending: waiting for a "
            "first study, ignored: recorded but not analysed, unsupported: no model for it)",
            ["kind", "outcome"], registry=r, namespace=ns,
        )
        self.analyses = Counter("analyses", "EnKF analyses performed (replays of late events included)", registry=r,
                                namespace=ns)
        self.dead_letters = Counter("dead_letters", "records sent to the dead-letter topic, by stage", ["stage"],
                                    registry=r, namespace=ns)
        self.forecasts = Counter("forecasts_published", "forecast records published (acknowledged by the brokers)",
                                 registry=r, namespace=ns)
        self.forecasts_invalid = Counter("forecasts_invalid", "forecasts not published: they failed the forecast "
                                         "schema (a bug; logged)", registry=r, namespace=ns)
        self.forecasts_refused = Counter("forecasts_refused", "forecast records the brokers refused for good (too "
                                         "large, a timestamp the topic refuses): not published, logged", registry=r,
                                         namespace=ns)
        self.batches = Counter("batches", "micro-batches committed", registry=r, namespace=ns)
        self.delivery_failures = Counter("delivery_failures", "flushes the brokers did not fully acknowledge",
                                         registry=r, namespace=ns)
        self.commit_failures = Counter("commit_failures", "offset commits that failed (the records are redelivered "
                                       "and skipped as applied)", registry=r, namespace=ns)
        self.rebalances = Counter("rebalances", "partitions assigned, revoked or lost", ["change"], registry=r,
                                  namespace=ns)
        self.latency_event = Histogram(
            "forecast_latency_event_time_seconds", "event time (occurred_at) of an applied event to the publication of "
            "the forecast reflecting it", buckets=EVENT_TIME_BUCKETS, registry=r, namespace=ns,
        )
        self.latency_record = Histogram(
            "forecast_latency_record_timestamp_seconds", "Kafka timestamp of the observation record to the publication "
            "of the forecast reflecting it", buckets=EVENT_TIME_BUCKETS, registry=r, namespace=ns,
        )
        self.latency_fetch = Histogram(
            "forecast_latency_fetch_seconds", "fetch of the observation record by this worker to the publication of "
            "the forecast reflecting it (the worker's own share)", buckets=LATENCY_BUCKETS, registry=r, namespace=ns,
        )
        self.stage_seconds = Histogram("stage_seconds", "wall time of a batch stage (decode, engine, publish, commit)",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r, namespace=ns)
        self.lag = Gauge("consumer_lag", "records of the partition not yet committed by the group (see stream.metrics "
                         "for how the high watermark is obtained)", ["topic", "partition"], registry=r, namespace=ns)
        self.assigned = Gauge("assigned_partitions", "partitions assigned to this worker", registry=r, namespace=ns)
        self.last_tick = Gauge("last_tick_timestamp_seconds", "wall time of the consumer loop's last iteration",
                               registry=r, namespace=ns)
        self._tick = time.monotonic()
        self._lag_lock = threading.Lock()

    # -- liveness ------------------------------------------------------------------------

    def tick(self) -> None:
        self._tick = time.monotonic()
        self.last_tick.set(time.time())

    def seconds_since_tick(self) -> float:
        return time.monotonic() - self._tick

    # -- lag -----------------------------------------------------------------------------

    def set_lag(self, lags: dict[tuple[str, int], int]) -> None:
        with self._lag_lock:
            for (topic, partition), lag in lags.items():
                self.lag.labels(topic, str(partition)).set(max(0, lag))

    def drop_lag(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget partitions this worker no longer owns (their lag is another worker's)."""
        with self._lag_lock:
            for topic, partition in partitions:
                try:
                    self.lag.remove(topic, str(partition))
                except KeyError:
                    pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        # Scrapes every few seconds would flood the worker's log.
        log.debug("metrics http: " + format, *args)


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text format) and ``/healthz`` on one port.

    ``/healthz`` answers 200 while ``healthy()`` is true (the consumer loop ticked recently),
    503 otherwise. ``port=0`` picks a free port (see ``.port``).
    """

    def __init__(self, metrics: WorkerMetrics, healthy: Callable[[], tuple[bool, str]], *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.metrics = metrics
        self.healthy = healthy
        prometheus_app = make_wsgi_app(metrics.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path in ("/healthz", "/healthz/"):
                ok, detail = self.healthy()
                body = (("ok: " if ok else "unhealthy: ") + detail + "\n").encode()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
                return [body]
            if path in ("/", "/metrics", "/metrics/"):
                return prometheus_app(environ, start_response)
            body = b"not found: /metrics or /healthz\n"
            start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            return [body]

        self._server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
        self.host = host
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"metrics-{self.port}", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
