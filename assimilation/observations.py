"""Typed observations: what stream/ decodes each RDF event into and what the engine consumes.

Plain frozen dataclasses with numpy or torch payloads: no file paths, no claim checks (stream/
resolves those before building these), no Kafka. Every observation carries the envelope's
``event_id`` (the idempotency key), the ``patient_id`` pseudonym and the event ``time``, an aware
datetime (a naive one is refused: its instant would depend on where it is read).

Units are the canonical ones of the term table: density as a fraction of carrying capacity,
volumes in mL, spacing in mm, marker values in the marker's canonical UCUM unit, ctDNA as a
tumour fraction in [0, 1], radiotherapy dose in Gy, chemotherapy dose in mg/m² where the event
made that computable (``TreatmentEvent.unit`` says when it is not).

Censored results (a marker or ctDNA result beyond the assay's limit) keep their value field:
it holds the limit, and ``comparator`` says which side of it the truth lies (None: a
measurement). Every field added after the first release has a default, so that journals and
code written before it read on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Union

import numpy as np
import torch

# The label meanings that are tumour: a study's ``segmentation`` is their union.
from schemas.terms import TUMOUR_MEANINGS

__all__ = [
    "COMPARATORS",
    "TUMOUR_MEANINGS",
    "ArrayLike",
    "CtdnaObservation",
    "ImagingObservation",
    "MarkerObservation",
    "Observation",
    "ObservationBase",
    "TreatmentEvent",
    "as_tensor",
]

#: FHIR Quantity.comparator: the true value is below (<, <=) or above (>=, >) the limit.
COMPARATORS = ("<", "<=", ">=", ">")

ArrayLike = Union[np.ndarray, torch.Tensor]


def as_tensor(a: ArrayLike, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """A torch tensor of a numpy or torch payload: a view where possible (payloads are only read,
    never written), a copy for read-only arrays such as memory-mapped volumes (torch cannot
    view those)."""
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a)
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    else:
        t = torch.as_tensor(a)
    return t.to(dtype=dtype or t.dtype, device=device or t.device)


@dataclass(frozen=True, kw_only=True)
class ObservationBase:
    """The envelope fields every observation shares."""

    event_id: str
    patient_id: str
    time: datetime  # event time (occurred_at), timezone-aware
    recorded_at: datetime | None = None  # when the source system recorded it (data time), aware

    def __post_init__(self) -> None:
        if not self.event_id:
            raise ValueError("event_id is required (it is the idempotency key)")
        if not self.patient_id:
            raise ValueError("patient_id is required")
        if not isinstance(self.time, datetime) or self.time.utcoffset() is None:
            raise ValueError(f"time must be a timezone-aware datetime, got {self.time!r}")
        if self.recorded_at is not None and (not isinstance(self.recorded_at, datetime)
                                             or self.recorded_at.utcoffset() is None):
            raise ValueError(f"recorded_at must be a timezone-aware datetime, got {self.recorded_at!r}")


@dataclass(frozen=True, kw_only=True)
class ImagingObservation(ObservationBase):
    """One imaging study resolved to arrays on the patient's voxel grid.

    density:          [X, Y, Z] float, tumour cell density as a fraction of capacity (a
                      cellularity map), or None.
    segmentation:     [X, Y, Z] 0/1 tumour mask (visible tumour), or None. For a labelled map,
                      the union of its tumour labels (TUMOUR_MEANINGS).
    tissue:           [X, Y, Z] integer labels (models.tissue: 0 outside, 1 gray, 2 white
                      matter), or None. The anatomy: needed for the study that starts a twin.
                      A map's CSF / ventricle label (3) is 0 here: no tumour cells, no flux
                      across its border, as models.tissue treats outside; ``csf`` keeps where.
    spacing_mm:       voxel size (hx, hy, hz) in mm.
    tumor_volume_ml:  visible tumour volume measured upstream, or None.
    labels:           [X, Y, Z] integer label map of the segmentation as sent, or None (a soft
                      mask, or no segmentation).
    label_meanings:   label -> meaning of ``labels``: tumor (compartment not stated), necrosis
                      (necrotic / non-enhancing core), edema (oedema, non-enhancing FLAIR
                      hyperintensity), enhancing, resection_cavity, background.
    label_convention: how the meanings were decided: explicit (the event's mapping), brats
                      (the BraTS convention: 1 necrosis, 2 edema, 3 or 4 enhancing), binary
                      (one tumour label), soft (a soft mask, no labels); None without one.
    csf:              [X, Y, Z] bool, the tissue map's CSF / ventricle voxels, or None.
    """

    spacing_mm: tuple[float, float, float]
    density: ArrayLike | None = None
    segmentation: ArrayLike | None = None
    tissue: ArrayLike | None = None
    tumor_volume_ml: float | None = None
    modality: str = "MR"
    labels: ArrayLike | None = None
    label_meanings: Mapping[int, str] | None = None
    label_convention: str | None = None
    csf: ArrayLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_meanings is not None:
            # JSON (a stored journal) gives keys back as strings: labels are integers.
            object.__setattr__(self, "label_meanings", {int(k): str(v) for k, v in self.label_meanings.items()})
        arrays = (self.density, self.segmentation, self.tissue, self.labels, self.csf)
        shapes = {tuple(a.shape) for a in arrays if a is not None}
        if len(shapes) > 1:
            raise ValueError(f"density, segmentation and tissue must share one grid, got {sorted(shapes)}")
        if any(len(s) != 3 for s in shapes):
            raise ValueError("imaging arrays must be 3-D [X, Y, Z]")
        if len(self.spacing_mm) != 3 or any(float(h) <= 0 for h in self.spacing_mm):
            raise ValueError(f"spacing_mm must be 3 positive values, got {self.spacing_mm}")
        if self.density is None and self.segmentation is None and self.tumor_volume_ml is None:
            raise ValueError("an imaging observation needs a density map, a segmentation or a volume")

    @property
    def shape(self) -> tuple[int, int, int] | None:
        for a in (self.density, self.segmentation, self.tissue):
            if a is not None:
                return tuple(int(n) for n in a.shape)  # type: ignore[return-value]
        return None

    def label_mask(self, *meanings: str) -> np.ndarray | None:
        """[X, Y, Z] bool: the voxels whose label means one of ``meanings`` (e.g. "enhancing";
        "necrosis"; TUMOUR_MEANINGS for the whole tumour, as on FLAIR), or None without a
        label map. A map that states no compartment ("tumor" only) has no enhancing voxels."""
        if self.labels is None or self.label_meanings is None:
            return None
        wanted = [label for label, meaning in self.label_meanings.items() if meaning in meanings]
        return np.isin(np.asarray(as_tensor(self.labels).cpu()), wanted)


@dataclass(frozen=True, kw_only=True)
class MarkerObservation(ObservationBase):
    """A serum tumour-marker result: LOINC ``code``, ``value`` in the canonical ``unit``.

    comparator: None for a measurement; for a censored result "<", "<=", ">=" or ">" and
                ``value`` is the limit (the true value lies on that side of it).
    limit:      the limit of a censored result (= value), or None.
    below_lod:  the result was sent as below the assay's limit of detection (comparator "<").
    detection_limit: the assay's limit of detection in ``unit``, where the event gave it.
    """

    code: str
    value: float
    unit: str
    comparator: str | None = None
    limit: float | None = None
    below_lod: bool = False
    detection_limit: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (float(self.value) > 0.0):
            raise ValueError(f"marker value must be positive, got {self.value}")
        _check_censoring(self.comparator, self.limit, self.value)


@dataclass(frozen=True, kw_only=True)
class CtdnaObservation(ObservationBase):
    """A ctDNA result expressed as the tumour fraction of cell-free DNA, in [0, 1].

    comparator, limit, below_lod, detection_limit: as MarkerObservation's (a fraction); for
    a censored result ``tumor_fraction`` is the limit. 146 of 485 results of a real feed were
    below the limit: that is a result (the fraction is under the limit), not a missing value.
    """

    tumor_fraction: float
    comparator: str | None = None
    limit: float | None = None
    below_lod: bool = False
    detection_limit: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= float(self.tumor_fraction) <= 1.0):
            raise ValueError(f"tumor_fraction must be in [0, 1], got {self.tumor_fraction}")
        _check_censoring(self.comparator, self.limit, self.tumor_fraction)


def _check_censoring(comparator: str | None, limit: float | None, value: float) -> None:
    if comparator is None:
        if limit is not None:
            raise ValueError("a limit is given only with a comparator (a censored result)")
        return
    if comparator not in COMPARATORS:
        raise ValueError(f"comparator must be one of {COMPARATORS}, got {comparator!r}")
    if limit is None or float(limit) != float(value):
        raise ValueError(f"a censored result's value is its limit, got value {value} and limit {limit}")


@dataclass(frozen=True, kw_only=True)
class TreatmentEvent(ObservationBase):
    """A radiotherapy fraction (dose in Gy) or a drug administration (dose in mg/m² where the
    event made that computable, else in the unit sent: ``unit`` is "mg/m2", "mg" or "mg/kg").

    planned=True marks a scheduled, not yet delivered, treatment: the twin uses it in forecasts
    until a delivered treatment of the same kind within half a day supersedes it.

    A chemotherapy dose sent in mg/kg converts to mg/m² only with the patient's weight and
    surface area, one in mg only with the surface area; without them it stays as sent: a body
    size is never assumed. The rest of what the event said:

    drug_code, drug_system: the drug's code (RxNorm preferred) and system: rxnorm, ncit, snomed
                      or atc; a code the term table lacks is carried all the same.
    reported_dose, reported_unit: the dose as sent (Gy/cGy, mg, mg/m2, mg/kg).
    total_dose_mg:    the dose in mg, where computable (mg/m² with surface area, mg/kg with weight).
    body_weight_kg, body_surface_area_m2: the body size the dose was computed for, if sent.
    route:            as sent (e.g. "oral", "IV").
    fraction_number, fractions_planned, target: a radiotherapy fraction's place in its course.
    cycle, cycles_planned, day_of_cycle (1 = the first day), cycle_length_days: a drug
                      administration's place in its course; regimen (as the feed names it)
                      and line_of_therapy (1 = first line) for either.
    """

    kind: str  # "radiotherapy" | "chemotherapy"
    dose: float
    unit: str
    drug: str | None = None
    planned: bool = False
    drug_code: str | None = None
    drug_system: str | None = None
    reported_dose: float | None = None
    reported_unit: str | None = None
    total_dose_mg: float | None = None
    body_weight_kg: float | None = None
    body_surface_area_m2: float | None = None
    route: str | None = None
    fraction_number: int | None = None
    fractions_planned: int | None = None
    target: str | None = None
    cycle: int | None = None
    cycles_planned: int | None = None
    day_of_cycle: int | None = None
    cycle_length_days: float | None = None
    regimen: str | None = None
    line_of_therapy: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ("radiotherapy", "chemotherapy"):
            raise ValueError(f"treatment kind must be radiotherapy or chemotherapy, got {self.kind!r}")
        if not (float(self.dose) >= 0.0):
            raise ValueError(f"dose must be non-negative, got {self.dose}")

    @property
    def dose_mg_per_m2(self) -> float | None:
        """The drug dose in mg/m², or None: a radiotherapy fraction, or a drug dose whose body
        size was not sent (then ``dose`` is in ``unit``, mg or mg/kg)."""
        return float(self.dose) if self.kind == "chemotherapy" and self.unit == "mg/m2" else None


Observation = Union[ImagingObservation, MarkerObservation, CtdnaObservation, TreatmentEvent]
