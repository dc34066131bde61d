"""Typed observations: what stream/ decodes each RDF event into and what the engine consumes.

Plain frozen dataclasses with numpy or torch payloads: no file paths, no claim checks (stream/
resolves those before building these), no Kafka. Every observation carries the envelope's
``event_id`` (the idempotency key), the ``patient_id`` pseudonym and the event ``time``, an aware
datetime (a naive one is refused: its instant would depend on where it is read).

Units are the canonical ones of the term table: density as a fraction of carrying capacity,
volumes in mL, spacing in mm, marker values in the marker's canonical UCUM unit, ctDNA as a
tumour fraction in [0, 1], radiotherapy dose in Gy, chemotherapy dose in mg/m².
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Union

import numpy as np
import torch

__all__ = [
    "ArrayLike",
    "CtdnaObservation",
    "ImagingObservation",
    "MarkerObservation",
    "Observation",
    "ObservationBase",
    "TreatmentEvent",
    "as_tensor",
]

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
    segmentation:     [X, Y, Z] 0/1 tumour mask (visible tumour), or None.
    tissue:           [X, Y, Z] integer labels (models.tissue: 0 outside, 1 gray, 2 white
                      matter), or None. The anatomy: needed for the study that starts a twin.
    spacing_mm:       voxel size (hx, hy, hz) in mm.
    tumor_volume_ml:  visible tumour volume measured upstream, or None.
    """

    spacing_mm: tuple[float, float, float]
    density: ArrayLike | None = None
    segmentation: ArrayLike | None = None
    tissue: ArrayLike | None = None
    tumor_volume_ml: float | None = None
    modality: str = "MR"

    def __post_init__(self) -> None:
        super().__post_init__()
        shapes = {tuple(a.shape) for a in (self.density, self.segmentation, self.tissue) if a is not None}
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


@dataclass(frozen=True, kw_only=True)
class MarkerObservation(ObservationBase):
    """A serum tumour-marker result: LOINC ``code``, ``value`` in the canonical ``unit``."""

    code: str
    value: float
    unit: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (float(self.value) > 0.0):
            raise ValueError(f"marker value must be positive, got {self.value}")


@dataclass(frozen=True, kw_only=True)
class CtdnaObservation(ObservationBase):
    """A ctDNA result expressed as the tumour fraction of cell-free DNA, in [0, 1]."""

    tumor_fraction: float

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= float(self.tumor_fraction) <= 1.0):
            raise ValueError(f"tumor_fraction must be in [0, 1], got {self.tumor_fraction}")


@dataclass(frozen=True, kw_only=True)
class TreatmentEvent(ObservationBase):
    """A radiotherapy fraction (dose in Gy) or a chemotherapy administration (dose in mg/m²).

    planned=True marks a scheduled, not yet delivered, treatment: the twin uses it in forecasts
    until a delivered treatment of the same kind within half a day supersedes it.
    """

    kind: str  # "radiotherapy" | "chemotherapy"
    dose: float
    unit: str
    drug: str | None = None
    planned: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in ("radiotherapy", "chemotherapy"):
            raise ValueError(f"treatment kind must be radiotherapy or chemotherapy, got {self.kind!r}")
        if not (float(self.dose) >= 0.0):
            raise ValueError(f"dose must be non-negative, got {self.dose}")


Observation = Union[ImagingObservation, MarkerObservation, CtdnaObservation, TreatmentEvent]
