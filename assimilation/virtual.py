"""Virtual patients as typed observations: twin experiments without Kafka.

What stream/ would decode from a virtual patient's events, built directly (tests, benchmarks,
notebooks). Event ids are uuid5s of (pseudonym, kind, time) under ``namespace``.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from models.virtual_patient import VirtualPatient

from .observations import CtdnaObservation, ImagingObservation, MarkerObservation, Observation, TreatmentEvent


def typed_observations(patient: VirtualPatient, day0: datetime, namespace: uuid.UUID, *, until: float | None = None,
                       treatments: bool = True, planned: bool = False) -> list[Observation]:
    """The patient's observations and delivered treatments up to ``until`` days (default: the
    observed period) in event order; every study carries the anatomy (as a DICOM-derived feed
    would). ``planned``: the rest of the treatment course follows as planned treatments.
    ``day0``: aware datetime of model time 0."""
    until = patient.config.observe_days if until is None else until

    def at(t: float) -> datetime:
        return day0 + timedelta(seconds=round(t * 86400.0))

    def eid(*parts: object) -> str:
        return str(uuid.uuid5(namespace, ":".join(map(str, (patient.pseudonym, *parts)))))

    out: list[Observation] = []
    for o in patient.observations:
        if o.t > until:
            continue
        common = dict(event_id=eid(o.kind, f"{o.t:.6f}"), patient_id=patient.pseudonym, time=at(o.t))
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
                out.append(TreatmentEvent(event_id=eid("treatment", e.kind, f"{e.t:.6f}"), patient_id=patient.pseudonym,
                                          time=at(e.t), kind=e.kind, dose=e.dose, unit=e.unit, drug=e.drug,
                                          planned=e.t > until))
    return sorted(out, key=lambda o: (o.time, o.event_id))
