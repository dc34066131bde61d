"""Virtual patients as typed observations, the way stream/ would decode their events."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from assimilation.observations import (
    CtdnaObservation,
    ImagingObservation,
    MarkerObservation,
    Observation,
    TreatmentEvent,
)
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
    """The patient's observations and delivered treatments up to ``until`` days (default: the
    observed period), in event order; every study carries the anatomy (as a DICOM-derived feed
    would). ``planned``: the rest of the treatment course follows as planned treatments."""
    until = patient.config.observe_days if until is None else until
    out: list[Observation] = []
    for o in patient.observations:
        if o.t > until:
            continue
        eid = event_id(patient, o.kind, f"{o.t:.6f}")
        common = dict(event_id=eid, patient_id=patient.pseudonym, time=at(o.t))
        if o.kind == "imaging":
            out.append(ImagingObservation(**common, spacing_mm=patient.grid.spacing, density=o.density.numpy(),
                                          segmentation=o.segmentation.numpy(), tissue=patient.tissue.numpy(),
                                          tumor_volume_ml=o.value))
        elif o.kind == "lab":
            out.append(MarkerObservation(**common, code=o.code, value=o.value, unit=o.unit))
        else:
            out.append(CtdnaObservation(**common, tumor_fraction=o.value))
    if treatments:
        for e in patient.treatments:
            if e.t <= until or planned:
                out.append(TreatmentEvent(event_id=event_id(patient, "treatment", e.kind, f"{e.t:.6f}"),
                                          patient_id=patient.pseudonym, time=at(e.t), kind=e.kind, dose=e.dose,
                                          unit=e.unit, drug=e.drug, planned=e.t > until))
    return sorted(out, key=lambda o: (o.time, o.event_id))
