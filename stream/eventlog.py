"""Event logs on disk: one JSON event per line (JSONL), in event-time order.

The log is what producers publish and what analysts replay; its order is (occurred_at, event_id)
so that two writers of the same events produce byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from schemas import parse_time


def event_sort_key(event: dict) -> tuple:
    return (parse_time(event["occurred_at"]), event["event_id"])


def dumps(event: dict) -> str:
    """Canonical JSON for an event: sorted keys, no spaces, UTF-8 (not ASCII-escaped)."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def write_events(path: Path, events: Iterable[dict]) -> int:
    """Write events sorted by event time; returns the count. Write-then-rename, never half a log."""
    ordered = sorted(events, key=event_sort_key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for event in ordered:
            f.write(dumps(event) + "\n")
    tmp.replace(path)
    return len(ordered)


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for every non-blank line; parsing is left to the caller so that
    a malformed line can be reported (or dead-lettered) with its original bytes."""
    with Path(path).open("rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield number, line


def read_events(path: Path) -> list[dict]:
    """Parse a JSONL log; raises ValueError naming the line of the first malformed record."""
    events = []
    for number, raw in read_lines(path):
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
    return events
