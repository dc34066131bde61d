"""Timestamps on the wire: ISO 8601 / RFC 3339 date-times that always carry a zone offset.

Event time decides the order in which observations reach a twin, so a zone-less time (whose
instant depends on where it is read) is refused rather than guessed. So is a time before
`EARLIEST_TIME`: event times travel as Kafka record timestamps, which must be positive.
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timezone

from .errors import ContractError

# Same pattern as envelope.json#/$defs/dateTime (a test keeps the two equal).
DATETIME_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$"
)
_DATETIME_RE = re.compile(DATETIME_PATTERN.removesuffix("$") + r"\Z")

# Every time the contract accepts must be publishable as a Kafka record timestamp, a positive
# number of milliseconds since the Unix epoch (the producer refuses 0 and below, and a record
# that passed validation but cannot be published fails again at every redelivery): the first
# such millisecond is the earliest time. No clinical event this service keeps a twin from is
# older. The latest time needs no bound here:
# four-digit years stay within Kafka's 64-bit timestamps, and the normalizer refuses event
# times further in the future than its clock allows.
EARLIEST_TIME = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=timezone.utc)
_EARLIEST_TEXT = "1970-01-01T00:00:00.001Z"


def parse_time(value: str) -> datetime:
    """Parse a wire timestamp into an aware datetime; raise ContractError otherwise."""
    if type(value) is str:
        # An event's times are parsed more than once (the contract's date-time format, then
        # the normalizer); a datetime is immutable and only successes are cached.
        return _parse_cached(value)
    return _parse(value)


@functools.lru_cache(maxsize=1024)
def _parse_cached(value: str) -> datetime:
    return _parse(value)


def _parse(value: str) -> datetime:
    if not isinstance(value, str) or not _DATETIME_RE.match(value):
        raise ContractError(
            f"{value!r:.80} is not an ISO 8601 date-time with a zone offset "
            "(e.g. 2024-03-01T09:30:00+01:00 or 2024-03-01T08:30:00Z)"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ContractError(f"{value!r} is not a valid date-time: {exc}") from None
    if parsed < EARLIEST_TIME:
        raise ContractError(
            f"{value!r:.80} is before {_EARLIEST_TEXT}: not a plausible time of a clinical event, "
            "and event times travel as Kafka record timestamps, which must be positive "
            "(milliseconds after 1970-01-01T00:00:00Z)"
        )
    return parsed


def format_time(moment: datetime) -> str:
    """Format an aware datetime for the wire (ISO 8601 with its zone offset)."""
    if not isinstance(moment, datetime):
        raise ContractError(f"expected a datetime, got {type(moment).__name__}")
    offset = moment.utcoffset()
    if offset is None:
        raise ContractError(
            f"{moment.isoformat()} has no time zone; pass an aware datetime "
            "(e.g. datetime(..., tzinfo=timezone.utc))"
        )
    if offset.total_seconds() % 60:
        raise ContractError(f"zone offset {offset} has seconds, which ISO 8601 cannot carry")
    return moment.isoformat()
