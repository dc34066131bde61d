"""A forecast subscriber: what dashboards and `oncotwin forecasts --follow` do."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator

from .consumer import BatchConsumer
from .settings import KafkaSettings
from .topics import Topics


def follow_forecasts(
    settings: KafkaSettings,
    topics: Topics,
    *,
    patient: str | None = None,
    from_beginning: bool = True,
    stop: threading.Event | None = None,
    idle_timeout: float | None = None,
    poll_timeout: float = 0.5,
    on_bad: Callable[[bytes, str], None] | None = None,
) -> Iterator[dict]:
    """Yield forecast records (parsed JSON) as they arrive, optionally for one patient.

    Reads every partition by manual assignment under a throwaway group id and never commits: a
    subscriber must not move the offsets of the service's groups. Stops when ``stop`` is set or, with ``idle_timeout``, after
    that many seconds without a record.
    """
    stop = stop or threading.Event()
    reset = "earliest" if from_beginning else "latest"
    # Manual assignment of every partition: no group join to wait for, no offsets to move.
    consumer = BatchConsumer(settings, group_id=f"oncotwin-follow-{uuid.uuid4()}",
                             config_overrides={"auto.offset.reset": reset})
    consumer.assign(topics.forecasts)
    idle = 0.0
    try:
        while not stop.is_set():
            records = consumer.poll_batch(max_records=200, timeout=poll_timeout)
            if not records:
                idle += poll_timeout
                if idle_timeout is not None and idle >= idle_timeout:
                    return
                continue
            idle = 0.0
            for record in records:
                if patient is not None and record.key != patient:
                    continue
                try:
                    yield json.loads(record.value)
                except (TypeError, ValueError) as exc:
                    if on_bad is not None:
                        on_bad(record.value or b"", f"not JSON: {exc}")
    finally:
        consumer.close()


def format_forecast(record: dict, quantity: str = "tumor_volume_ml") -> str:
    """One line per forecast: patient, analysis time, scenario, median [2.5 %, 97.5 %] per horizon."""
    parts = []
    for h in record.get("horizons", []):
        q = h.get("quantities", {}).get(quantity)
        if q:
            parts.append(f"+{h['days']:g}d {q['median']:.3g} [{q['lo']:.3g}, {q['hi']:.3g}]")
    unit = next((h["quantities"][quantity].get("unit", "") for h in record.get("horizons", []) if quantity in h.get("quantities", {})), "")
    return (f"{record.get('patient_id')} @ {record.get('analysis_time')} ({record.get('scenario', 'planned')}, "
            f"{len(record.get('based_on_events', []))} events) {quantity} {unit}: " + "  ".join(parts))
