"""Treatment plans for therapy rehearsal, from plain data (a parsed JSON plan file).

A plan is ``{"name": str, "treatments": [...], "courses": [...]}`` where each treatment is
``{"kind": "radiotherapy" | "chemotherapy", "at": ISO 8601 with zone, "dose": number,
"unit": "Gy" | "cGy" | "mg/m2", "drug": optional}`` and each course expands to daily
treatments: ``{"kind": ..., "start": ISO time, "count": n, "dose": d, "unit": u,
"every_days": 1, "weekdays_only": true, "drug": optional}``. Doses are converted to the
model's units (Gy, mg/m²) through schemas.units, so a plan in cGy means what it says. An empty
plan means "no further treatment" (a plan replaces the twin's own planned treatments).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from schemas import convert, parse_time

from .observations import TreatmentEvent

MODEL_UNITS = {"radiotherapy": "Gy", "chemotherapy": "mg/m2"}


class PlanError(ValueError):
    """A plan file that cannot be read as a treatment plan (the message says where)."""


def _event(patient_id: str, name: str, index: int, kind: Any, when, dose: Any, unit: Any, drug: Any) -> TreatmentEvent:
    if kind not in MODEL_UNITS:
        raise PlanError(f"plan {name!r} item {index}: kind must be radiotherapy or chemotherapy, not {kind!r}")
    try:
        value = convert(float(dose), str(unit), MODEL_UNITS[kind])
    except (TypeError, ValueError) as exc:
        raise PlanError(f"plan {name!r} item {index}: dose {dose!r} {unit!r}: {exc}") from exc
    return TreatmentEvent(event_id=f"plan-{name}-{index}", patient_id=patient_id, time=when, kind=kind,
                          dose=value, unit=MODEL_UNITS[kind], drug=drug, planned=True)


def _time(value: Any, name: str, index: int):
    try:
        return parse_time(value)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"plan {name!r} item {index}: time {value!r} is not ISO 8601 with a zone") from exc


def plan_from_dict(plan: Mapping[str, Any], patient_id: str) -> tuple[str, list[TreatmentEvent]]:
    """(name, planned treatments in time order) of a parsed plan file."""
    if not isinstance(plan, Mapping) or not isinstance(plan.get("name"), str) or not plan["name"]:
        raise PlanError("a plan needs a non-empty string 'name'")
    name = plan["name"]
    events: list[TreatmentEvent] = []
    for item in plan.get("treatments", []):
        i = len(events)
        events.append(_event(patient_id, name, i, item.get("kind"), _time(item.get("at"), name, i),
                             item.get("dose"), item.get("unit"), item.get("drug")))
    for course in plan.get("courses", []):
        start = _time(course.get("start"), name, len(events))
        count, every = int(course.get("count", 0)), float(course.get("every_days", 1))
        weekdays_only = bool(course.get("weekdays_only", course.get("kind") == "radiotherapy"))
        if count <= 0 or every <= 0:
            raise PlanError(f"plan {name!r}: a course needs count > 0 and every_days > 0")
        k, when = 0, start
        while k < count:
            if not (weekdays_only and when.weekday() >= 5):
                events.append(_event(patient_id, name, len(events), course.get("kind"), when,
                                     course.get("dose"), course.get("unit"), course.get("drug")))
                k += 1
            when = when + timedelta(days=every)
    return name, sorted(events, key=lambda e: e.time)
