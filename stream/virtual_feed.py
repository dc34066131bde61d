"""A synthetic clinical feed: virtual patients written as files and schema-valid events.

Layout of a cohort folder (also the imaging root for its claim checks):

    events.jsonl                       every event of every patient, in event-time order
    truth.json                         true parameters and daily trajectories (for scoring)
    <pseudonym>/anatomy.nii.gz         tissue labels (0 outside, 1 gray, 2 white matter)
    <pseudonym>/truth.safetensors      true density fields at stored days
    <pseudonym>/mri-<day>-seg.nii.gz   segmentation, and -density.nii.gz cellularity map
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.virtual_patient import SyntheticObservation, TreatmentEvent, VirtualPatient, hash_seed
from schemas import make_event

from .eventlog import write_events
from .volumes import claim_check, write_nifti

# Namespace of the deterministic event ids of virtual feeds (uuid5).
VIRTUAL_NAMESPACE = uuid.UUID("6f0c6a53-8f0e-5d0b-9d5b-3c1f0e7a9b21")
# Day 0 of every virtual patient is a Monday at 00:00 clinic time, some weeks after this one.
EPOCH = datetime(2025, 1, 6, tzinfo=timezone(timedelta(hours=1)))
SOURCE = "virtual-feed"
TEMOZOLOMIDE_RXNORM = "37776"


@dataclass(frozen=True)
class WrittenCohort:
    root: Path
    events_path: Path
    truth_path: Path
    n_events: int
    day0: dict[str, str]  # pseudonym -> ISO time of day 0


def day0_of(patient: VirtualPatient) -> datetime:
    weeks = hash_seed("day0", patient.seed, patient.pseudonym) % 52
    return EPOCH + timedelta(weeks=weeks)


def _uid(*parts: object) -> str:
    """A DICOM UID under the UUID-derived root 2.25 (PS3.5 B.2)."""
    return "2.25." + str(uuid.uuid5(VIRTUAL_NAMESPACE, ":".join(map(str, parts))).int)


def _event_id(patient: VirtualPatient, *parts: object) -> str:
    return str(uuid.uuid5(VIRTUAL_NAMESPACE, ":".join(map(str, (patient.pseudonym, *parts)))))


def _at(day0: datetime, t: float) -> datetime:
    # Whole seconds: event times on a feed carry no sub-second precision.
    return day0 + timedelta(seconds=round(t * 86400.0))


def _recorded(day0: datetime, t: float, delay_hours: float) -> datetime:
    return _at(day0, t) + timedelta(hours=delay_hours)


def treatment_event(patient: VirtualPatient, e: TreatmentEvent, day0: datetime) -> dict:
    if e.kind == "radiotherapy":
        body = {
            "type": "radiotherapy",
            "dose": {"value": e.dose, "unit": e.unit},
            "fraction_number": e.fraction_number,
            "fractions_planned": patient.config.rt_fractions,
            "target": "brain",
        }
    else:
        body = {
            "type": "chemotherapy",
            "drug": {"name": e.drug or "unknown", "rxnorm": TEMOZOLOMIDE_RXNORM},
            "dose": {"value": e.dose, "unit": e.unit},
            "route": "oral",
        }
    return make_event(
        "treatment",
        patient.pseudonym,
        _at(day0, e.t),
        body,
        source=SOURCE,
        recorded_at=_recorded(day0, e.t, 1.0),
        event_id=_event_id(patient, "treatment", e.kind, f"{e.t:.6f}"),
    )


def observation_event(patient: VirtualPatient, o: SyntheticObservation, day0: datetime, root: Path) -> dict:
    eid = _event_id(patient, o.kind, o.code or "", f"{o.t:.6f}")
    when = _at(day0, o.t)
    if o.kind == "imaging":
        folder = root / patient.pseudonym
        stem = f"mri-{o.t:08.3f}".replace(".", "_")
        spacing = patient.grid.spacing
        seg_path = folder / f"{stem}-seg.nii.gz"
        den_path = folder / f"{stem}-density.nii.gz"
        write_nifti(seg_path, o.segmentation.numpy(), spacing)
        write_nifti(den_path, o.density.numpy(), spacing)
        body = {
            "modality": "MR",
            "study_uid": _uid(patient.pseudonym, "study", o.t),
            "series_uid": _uid(patient.pseudonym, "series", o.t),
            "segmentation_uri": claim_check(seg_path, root, format="nifti", content="segmentation"),
            "voxel_spacing_mm": list(spacing),
            "measures": {
                "tumor_volume": {"value": round(o.value, 4), "unit": o.unit},
                "cellularity_map_uri": claim_check(den_path, root, format="nifti", content="density"),
                "tissue_map_uri": claim_check(root / patient.pseudonym / "anatomy.nii.gz", root, format="nifti", content="segmentation"),
            },
        }
        return make_event("imaging", patient.pseudonym, when, body, source=SOURCE, recorded_at=_recorded(day0, o.t, 26.0), event_id=eid)
    if o.kind == "lab":
        body = {"code": o.code, "value": round(o.value, 3), "unit": o.unit, "specimen": "serum"}
        return make_event("lab", patient.pseudonym, when, body, source=SOURCE, recorded_at=_recorded(day0, o.t, 4.0), event_id=eid)
    if o.kind == "ctdna":
        body = {"measure": "tumor_fraction", "value": float(f"{o.value:.6g}"), "unit": "1", "assay": "low-pass WGS (synthetic)"}
        return make_event("ctdna", patient.pseudonym, when, body, source=SOURCE, recorded_at=_recorded(day0, o.t, 72.0), event_id=eid)
    raise ValueError(f"unknown observation kind {o.kind!r}")


def patient_events(patient: VirtualPatient, root: Path) -> list[dict]:
    """Every event of one patient (writing its imaging files under root)."""
    day0 = day0_of(patient)
    events = [treatment_event(patient, e, day0) for e in patient.treatments if e.t <= patient.config.observe_days]
    events += [observation_event(patient, o, day0, root) for o in patient.observations]
    return events


def truth_record(patient: VirtualPatient) -> dict:
    return {
        "pseudonym": patient.pseudonym,
        "day0": day0_of(patient).isoformat(),
        "grid": {"shape": list(patient.grid.shape), "spacing_mm": list(patient.grid.spacing)},
        "params": patient.params,
        "observe_days": patient.config.observe_days,
        "days": patient.truth_times.tolist(),
        "volume_ml": [round(v, 6) for v in patient.truth_volume_ml.tolist()],
        "burden_ml": [round(v, 6) for v in patient.truth_burden_ml.tolist()],
        "marker": {"code": patient.config.marker[0], "unit": patient.config.marker[1], "values": [round(v, 6) for v in patient.truth_marker.tolist()]},
        "ctdna_tumor_fraction": [float(f"{v:.6g}") for v in patient.truth_ctdna.tolist()],
        "treatments": [
            {"kind": e.kind, "day": e.t, "dose": e.dose, "unit": e.unit} for e in patient.treatments
        ],
    }


def write_cohort(patients: list[VirtualPatient], root: Path) -> WrittenCohort:
    """Write patients' files, event log and truth under root (created if missing)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    events: list[dict] = []
    truth = []
    for p in patients:
        folder = root / p.pseudonym
        write_nifti(folder / "anatomy.nii.gz", p.tissue.to(torch.uint8).numpy(), p.grid.spacing)
        days = sorted(p.truth_fields)
        save_file(
            {"days": torch.tensor(days, dtype=torch.float64), "density": torch.stack([p.truth_fields[d] for d in days]).contiguous(), "u0": p.u0.contiguous()},
            str(folder / "truth.safetensors"),
        )
        events += patient_events(p, root)
        truth.append(truth_record(p))
    events_path = root / "events.jsonl"
    n = write_events(events_path, events)
    truth_path = root / "truth.json"
    truth_path.write_text(json.dumps({"patients": truth}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return WrittenCohort(root, events_path, truth_path, n, {p.pseudonym: day0_of(p).isoformat() for p in patients})
