"""Virtual patients as typed observations, the way stream/ would decode their events."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from assimilation.observations import Observation
from assimilation.virtual import typed_observations as _typed
from models.grid import Grid
from models.virtual_patient import CohortConfig, VirtualPatient

# Day 0 of every test patient: a Monday, in a zone that is not UTC (times must carry zones).
DAY0 = datetime(2025, 3, 3, tzinfo=timezone(timedelta(hours=1)))
NAMESPACE = uuid.UUID("0b7b7f0e-3c1a-4d51-9d8e-6f2b8f1c2a11")

#: CI-sized cohort: 16³ voxels of 5 mm, 200 days observed, truth kept 100 days longer.
COHORT = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=200.0, truth_margin_days=100.0)


def at(t: float) -> datetime:
    """Model time (days since day 0) as an aware datetime, whole seconds as on the feed."""
    return DAY0 + timedelta(seconds=round(t * 86400.0))


def event_id(patient: VirtualPatient, *parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, ":".join(map(str, (patient.pseudonym, *parts)))))


def typed_observations(patient: VirtualPatient, until: float | None = None, treatments: bool = True,
                       planned: bool = False) -> list[Observation]:
    """assimilation.virtual.typed_observations with the test cohort's day 0 and id namespace."""
    return _typed(patient, DAY0, NAMESPACE, until=until, treatments=treatments, planned=planned)
