"""Decoded observations (stream.decode) to the typed observations the engine consumes.

The worker's bridge between the RDF world and ``assimilation.observations``:

- lab       -> ``MarkerObservation`` (LOINC code from the term IRI, canonical value and unit;
               a censored result's comparator and limit)
- ctdna     -> ``CtdnaObservation`` for the tumour-fraction measure (censored ones too); the
               other measures (VAF, copies/mL, cfDNA ng/mL) have no observation operator yet
               and are *unsupported*
- treatment -> ``TreatmentEvent`` for radiotherapy (Gy) and any drug (mg/m2 where the event
               gave the body size to compute it, else mg or mg/kg as sent: the twin decides
               what it can use); surgery is unsupported (the model has no resection yet)
- imaging   -> ``ImagingObservation``: the density map, segmentation and tissue map are read
               from NIfTI files through their claim checks, resolved under the imaging root
               only and verified by size and SHA-256 again here (the file may have changed
               since the normalizer looked at it; a twin must never start from other pixels
               than the event named). A labelled segmentation keeps its label map and what
               each label means; its ``segmentation`` is the union of the tumour labels. A
               tissue map's CSF / ventricle label (3) becomes 0 (outside: no tumour, no flux).

Every typed observation carries the event's ``recorded_at`` (when the feed recorded it).

Failures are ``AdaptError``s with a stage (claim-check, nifti, adapt) and a reason a person can
act on: the worker dead-letters the record. Unsupported events are ``Unsupported``: valid input
that the engine cannot use; the worker counts and commits past them.

The tissue map. The contract carries it as ``body.measures.tissue_map_uri``, but the RDF the
normalizer publishes (stream.rdf / stream.decode) does not carry that claim check yet. Until it
does, ``tissue_claim`` looks for it in this order: a ``tissue_map`` attribute of the decoded
observation, an ``ot:tissueMap`` claim check in the JSON-LD, and finally (``anatomy_fallback``)
a file of that name beside the study's segmentation or density map (the virtual feed's
``<pseudonym>/anatomy.nii.gz``). A fallback file has no sha256 to verify against: it is
resolved under the root all the same and checked for shape, spacing and labels.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from assimilation.observations import (
    CtdnaObservation,
    ImagingObservation,
    MarkerObservation,
    Observation,
    TreatmentEvent,
)
from schemas.terms import NAMESPACES, TermTable, default_terms
from stream.decode import ClaimCheck, DecodedObservation, DecodeError, decode_jsonld
from stream.imaging import FileCheckError, ImagingConfig, resolve, segmentation_labels
from stream.rdf import OT, expand

log = logging.getLogger(__name__)

#: Tissue labels a tissue map may hold (imaging.json): 0 outside, 1 gray matter, 2 white
#: matter (models.tissue), 3 CSF / ventricles.
TISSUE_LABELS = frozenset({0, 1, 2, 3})
#: CSF and ventricles hold no tumour cells and no flux crosses their border: models.tissue's
#: OUTSIDE (0), which already stands for them in its synthetic brains.
CSF_LABEL = 3
#: Relative tolerance of voxel spacings (file header vs event), as stream.imaging uses.
SPACING_RTOL = 1e-3
#: Drug dose units a TreatmentEvent carries: mg/m2 (canonical, where computable), or the
#: unit sent when no body size was given to convert it.
CHEMO_UNITS = frozenset({"mg/m2", "mg", "mg/kg"})
RADIOTHERAPY_UNITS = frozenset({"Gy"})


@functools.lru_cache(maxsize=1)
def _terms() -> TermTable:
    # default_terms() reads and checks the CSVs on every call: once per process is enough.
    return default_terms()


class AdaptError(ValueError):
    """A record that cannot become a typed observation; ``stage`` names where it failed."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        self.reason = reason
        super().__init__(f"{stage}: {reason}")


class Unsupported(Exception):
    """A valid observation the engine has no model for (counted, committed past)."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class AdaptConfig:
    """imaging_root: where claim checks resolve. anatomy_fallback: file name looked up beside a
    study's segmentation / density map when the event carries no tissue claim check (None:
    no fallback; such a study cannot start a twin but still updates an existing one)."""

    imaging_root: Path | None
    anatomy_fallback: str | None = "anatomy.nii.gz"


@dataclass(frozen=True)
class Adapted:
    """One record's typed observation with what the worker reports about it."""

    decoded: DecodedObservation
    observation: Observation


def decode_record(value: bytes | None) -> DecodedObservation:
    """``decode_jsonld`` with every failure turned into an ``AdaptError`` of stage decode."""
    if value is None or len(value) == 0:
        raise AdaptError("decode", "the record has no value (an observation is a JSON-LD document)")
    try:
        return decode_jsonld(value)
    except DecodeError as exc:
        raise AdaptError("decode", str(exc)[:400]) from None
    except (UnicodeDecodeError, RecursionError, ValueError, TypeError, KeyError, IndexError) as exc:
        # A malformed literal (a date, a number) inside otherwise well-formed JSON-LD.
        raise AdaptError("decode", f"malformed observation ({type(exc).__name__}: {str(exc)[:300]})") from None


def adapt(decoded: DecodedObservation, config: AdaptConfig, document: bytes | None = None) -> Observation:
    """The typed observation of ``decoded`` (``document``: its JSON-LD, for claim checks the
    decoder does not expose yet). Raises AdaptError or Unsupported."""
    kind = decoded.kind
    try:
        if kind == "lab":
            return _marker(decoded)
        if kind == "ctdna":
            return _ctdna(decoded)
        if kind == "treatment":
            return _treatment(decoded)
        if kind == "imaging":
            return _imaging(decoded, config, document)
    except (AdaptError, Unsupported):
        raise
    except FileCheckError as exc:
        raise AdaptError(exc.stage, str(exc)) from None
    except ValueError as exc:
        # The typed observations check their invariants (positive markers, fractions in
        # [0, 1], aware times, one grid): a value that breaks them is bad input.
        raise AdaptError("adapt", f"{type(exc).__name__}: {str(exc)[:300]}") from None
    raise AdaptError("adapt", f"unknown observation kind {kind!r}")


# -- scalars ------------------------------------------------------------------------------------


def _common(d: DecodedObservation) -> dict[str, Any]:
    return {"event_id": d.event_id, "patient_id": d.patient_id, "time": d.time, "recorded_at": d.recorded_at}


def _censoring(d: DecodedObservation, value: float) -> dict[str, Any]:
    return {
        "comparator": d.comparator, "limit": value if d.comparator is not None else None,
        "below_lod": d.below_lod, "detection_limit": d.detection_limit,
    }


def _value(d: DecodedObservation) -> float:
    if d.value is None or not math.isfinite(float(d.value)):
        raise AdaptError("adapt", f"the {d.kind} observation has no finite value")
    return float(d.value)


def _marker(d: DecodedObservation) -> MarkerObservation:
    try:
        term = _terms().by_iri(d.code)
    except Exception:  # noqa: BLE001  (UnknownCodeError: a code the term table lacks)
        raise AdaptError("adapt", f"the lab code {d.code!r:.120} is not a term of the table") from None
    value = _value(d)
    return MarkerObservation(
        **_common(d), code=term.code, value=value, unit=d.unit or term.canonical_unit or "1", **_censoring(d, value),
    )


def _ctdna(d: DecodedObservation) -> CtdnaObservation:
    if d.ctdna_measure != "tumor_fraction":
        raise Unsupported("ctdna", f"ctDNA measure {d.ctdna_measure!r} has no observation operator (tumor_fraction only)")
    value = _value(d)
    return CtdnaObservation(**_common(d), tumor_fraction=value, **_censoring(d, value))


def _treatment(d: DecodedObservation) -> TreatmentEvent:
    kind = d.treatment_type
    if kind not in ("radiotherapy", "chemotherapy"):
        raise Unsupported("treatment", f"treatment type {kind!r} is not modelled (radiotherapy and chemotherapy are)")
    if d.dose is None or not math.isfinite(float(d.dose)):
        raise AdaptError("adapt", f"the {kind} event has no finite dose")
    allowed = RADIOTHERAPY_UNITS if kind == "radiotherapy" else CHEMO_UNITS
    if d.dose_unit not in allowed:
        raise AdaptError("adapt", f"a {kind} dose in {d.dose_unit!r} cannot be used: expected one of {sorted(allowed)}")
    # A dose that stayed in mg or mg/kg says so in its unit: nothing here guesses a body size.
    reported = d.reported_value is not None
    return TreatmentEvent(
        **_common(d), kind=kind, dose=float(d.dose), unit=str(d.dose_unit), drug=d.drug_name,
        planned=bool(d.planned), **_drug_code(d.drug_codes),
        reported_dose=d.reported_value if reported else float(d.dose),
        reported_unit=d.reported_unit if reported else str(d.dose_unit),
        total_dose_mg=d.total_dose_mg, body_weight_kg=d.body_weight_kg, body_surface_area_m2=d.body_surface_area_m2,
        route=d.route, fraction_number=d.fraction_number, fractions_planned=d.fractions_planned, target=d.target,
        cycle=d.cycle, cycles_planned=d.cycles_planned, day_of_cycle=d.day_of_cycle,
        cycle_length_days=d.cycle_length_days, regimen=d.regimen, line_of_therapy=d.line_of_therapy,
    )


def _drug_code(codes: tuple[str, ...]) -> dict[str, str | None]:
    """The drug's code and system among the IRIs it was published with, RxNorm first."""
    for system in ("rxnorm", "ncit", "snomed", "atc"):
        for iri in codes:
            if iri.startswith(NAMESPACES[system]):
                return {"drug_code": iri[len(NAMESPACES[system]):], "drug_system": system}
    return {"drug_code": None, "drug_system": None}


# -- imaging ------------------------------------------------------------------------------------


def _claim_dict(claim: ClaimCheck) -> dict[str, Any]:
    return {"uri": claim.uri, "sha256": claim.sha256, "size": claim.size, "format": claim.format}


def _load(claim: Mapping[str, Any], field: str, config: AdaptConfig, spacing: tuple[float, float, float]) -> np.ndarray:
    """Resolve and verify a claim check under the root, then read its 3-D volume."""
    fmt = claim.get("format") or "nifti"
    if fmt != "nifti":
        raise AdaptError("nifti", f"{field}: only NIfTI volumes are read, not {fmt!r}")
    resolved = resolve(claim, field, ImagingConfig(config.imaging_root), url_allowed=False)
    assert resolved.path is not None  # url_allowed=False: a local file or an error
    return _read_volume(resolved.path, field, spacing)


def _read_volume(path: Path, field: str, spacing: tuple[float, float, float]) -> np.ndarray:
    from stream.volumes import read_nifti  # noqa: PLC0415  (nibabel: only when imaging arrives)

    try:
        data, zooms = read_nifti(path)
        array = np.asarray(data)
    except Exception as exc:  # noqa: BLE001  (unreadable or truncated image)
        raise AdaptError("nifti", f"{field}: not a readable NIfTI image ({type(exc).__name__}: {str(exc)[:160]})") from None
    if array.ndim != 3:
        raise AdaptError("nifti", f"{field}: expected a 3-D volume, got shape {tuple(array.shape)}")
    if len(zooms) != 3 or not all(math.isclose(a, b, rel_tol=SPACING_RTOL) for a, b in zip(zooms, spacing)):
        raise AdaptError("nifti", f"{field}: voxel spacing {tuple(zooms)} mm differs from the study's {tuple(spacing)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise AdaptError("nifti", f"{field}: the image holds NaN or infinite values")
    return array


def _density(array: np.ndarray, field: str) -> np.ndarray:
    values = array.astype(np.float32)
    if (values < 0).any() or (values > 1.0 + 1e-6).any():
        raise AdaptError("nifti", f"{field}: a density (cellularity) map holds fractions within [0, 1]")
    return np.clip(values, 0.0, 1.0)


def _segmentation(array: np.ndarray, d: DecodedObservation) -> dict[str, Any]:
    """The segmentation's tumour mask (0/1 float32: the union of its tumour labels) and, for a
    label map, the map and what each label means. The labels the normalizer published are
    checked against the map again (the same rule, stream.imaging.segmentation_labels)."""
    if (array < 0).any():
        raise AdaptError("nifti", "segmentation: the image holds negative values (a mask or label map is >= 0)")
    explicit = dict(d.segmentation_labels) if d.label_convention == "explicit" and d.segmentation_labels else None
    mask, meanings, convention = segmentation_labels(array, explicit, "segmentation")
    return {
        "segmentation": mask.astype(np.float32),
        "labels": array.astype(np.int64) if meanings is not None else None,
        "label_meanings": dict(meanings) if meanings is not None else None,
        "label_convention": convention,
    }


def _tissue(array: np.ndarray, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels [X, Y, Z] int64 of models.tissue, CSF mask [X, Y, Z] bool): CSF becomes 0."""
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise AdaptError("nifti", f"{field}: tissue labels must be integers")
    labels = array.astype(np.int64)
    found = set(np.unique(labels).tolist())
    if not found <= TISSUE_LABELS:
        raise AdaptError(
            "nifti", f"{field}: tissue labels must be 0 (outside), 1 (gray matter), 2 (white matter) or 3 (CSF, "
            f"ventricles), found {sorted(found)[:10]}",
        )
    csf = labels == CSF_LABEL
    labels[csf] = 0
    if not (labels > 0).any():
        raise AdaptError("nifti", f"{field}: the tissue map has no brain voxel")
    return labels, csf


def tissue_claim(decoded: DecodedObservation, document: bytes | None) -> ClaimCheck | None:
    """The tissue-map claim check of a study, where the published observation carries one."""
    claim = getattr(decoded, "tissue_map", None)  # a decoder that knows ot:tissueMap
    if isinstance(claim, ClaimCheck):
        return claim
    if document is None:
        return None
    try:
        doc = json.loads(document)
    except ValueError:
        return None
    nodes = doc.get("@graph", []) if isinstance(doc, dict) else []
    for node in nodes:
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key.startswith("@") or expand(key) != OT + "tissueMap" or not isinstance(value, dict):
                continue
            fields = {expand(k): v for k, v in value.items()}

            def text(name: str) -> str | None:
                v = fields.get(OT + name)
                v = v.get("@value") if isinstance(v, dict) else v
                return None if v is None else str(v)

            try:
                return ClaimCheck(uri=text("uri") or "", sha256=text("sha256") or "", size=int(text("byteSize") or 0),
                                  format=text("format"), content=text("content"))
            except ValueError:
                return None
    return None


def _fallback_tissue_path(decoded: DecodedObservation, config: AdaptConfig) -> tuple[str, Path] | None:
    """(uri, path) of the anatomy file beside the study's segmentation or density map."""
    if config.anatomy_fallback is None or config.imaging_root is None:
        return None
    for claim in (decoded.segmentation, decoded.density_map):
        if claim is None or not claim.uri or "://" in claim.uri or claim.uri.lower().startswith("file:"):
            continue
        uri = str(PurePosixPath(claim.uri).parent / config.anatomy_fallback)
        if ".." in PurePosixPath(uri).parts or uri.startswith("/"):
            continue
        root = Path(config.imaging_root).resolve()
        path = (root / uri).resolve()
        # Same rule as stream.imaging.resolve: the file (after symlinks) stays under the root.
        if path.is_file() and path.is_relative_to(root):
            return uri, path
    return None


def _imaging(d: DecodedObservation, config: AdaptConfig, document: bytes | None) -> ImagingObservation:
    spacing = d.voxel_spacing_mm
    if spacing is None:
        raise AdaptError("adapt", "the imaging study has no voxel spacing")
    spacing = tuple(float(h) for h in spacing)  # type: ignore[assignment]
    density = tissue = csf = None
    segmentation: dict[str, Any] = {}
    if d.density_map is not None:
        density = _density(_load(_claim_dict(d.density_map), "densityMap", config, spacing), "densityMap")
    if d.segmentation is not None:
        segmentation = _segmentation(_load(_claim_dict(d.segmentation), "segmentation", config, spacing), d)
    claim = tissue_claim(d, document)
    if claim is not None:
        tissue, csf = _tissue(_load(_claim_dict(claim), "tissueMap", config, spacing), "tissueMap")
    else:
        found = _fallback_tissue_path(d, config)
        if found is not None:
            uri, path = found
            tissue, csf = _tissue(_read_volume(path, f"tissue map {uri} (fallback)", spacing), f"tissue map {uri}")
    volume = d.volume_ml if d.volume_ml is not None and math.isfinite(d.volume_ml) else None
    return ImagingObservation(
        **_common(d), spacing_mm=spacing, density=density, tissue=tissue,  # type: ignore[arg-type]
        tumor_volume_ml=volume, modality=d.modality or "MR", csf=csf if csf is not None and csf.any() else None,
        **segmentation,
    )
