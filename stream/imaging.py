"""Imaging claim checks: resolve them under the configured root, verify them, read what they hold.

An imaging event carries claim checks (path or URL, sha256, size) instead of pixels. Before an
event is published the normalizer:

- resolves every claim check under the imaging root only: ``..`` segments, absolute paths and
  ``file:`` URIs outside the root, and symbolic links whose target leaves the root are refused;
  http(s) URLs are accepted only under the configured DICOMweb base (and are then recorded as
  unverified: pixels are not fetched here);
- checks that the file exists, is a regular file, and has the size and SHA-256 the event says;
- reads DICOM headers with pydicom (``stop_before_pixels=True``): a Part 10 file whose modality,
  study and series instance UIDs match the event, with sane dates, and whose pixel data element
  is complete (a truncated file is caught without reading the pixels);
- reads the segmentation and density map (NIfTI) and derives the tumour volume (mL) and the
  centroid (mm, in the image's world coordinates); decides what each label of the segmentation
  means (``segmentation_labels``: the event's mapping, checked against the labels the map
  holds, or the BraTS convention, or a plain tumour mask) and counts the tumour labels only.

Errors are ``FileCheckError``s whose message names the field and says what was expected. Patient
identifying DICOM attributes (PatientName, PatientID, ...) are never read into a message.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import struct
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from schemas.terms import BRATS_LABELS, TUMOUR_MEANINGS
from stream.rdf import ClaimCheckFacts, FileFacts

# Segmentations stored as floating point (soft masks) count a voxel as tumour from this value.
SOFT_MASK_THRESHOLD = 0.5
# A DICOM StudyDate may differ from the event date by this much (studies spanning midnight,
# event times given in another zone than the scanner's).
STUDY_DATE_TOLERANCE = timedelta(days=1)
OLDEST_DICOM_YEAR = 1900
_SPACING_RTOL = 1e-3


class FileCheckError(ValueError):
    """A claim check that cannot be used; ``stage`` is claim-check, dicom or nifti."""

    def __init__(self, stage: str, field: str, reason: str) -> None:
        self.stage = stage
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


@dataclass(frozen=True)
class ImagingConfig:
    root: Path | None = None
    dicomweb_base: str | None = None
    future_skew: timedelta = timedelta(days=1)


# -- resolution -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """A claim check resolved to a local file (``path``) or accepted as a DICOMweb URL."""

    facts: ClaimCheckFacts
    path: Path | None


def resolve(claim: Mapping[str, Any], field: str, config: ImagingConfig, *, url_allowed: bool) -> Resolved:
    """Resolve and verify one claim check (``field`` names it in errors, e.g. body.dicom_uri)."""
    uri = str(claim["uri"])
    lowered = uri.lower()
    if lowered.startswith(("http://", "https://")):
        base = config.dicomweb_base
        if not base:
            raise FileCheckError(
                "claim-check", f"{field}.uri",
                f"{uri!r:.200} is an http(s) URL but no DICOMweb base is configured "
                "(ONCOTWIN_DICOMWEB_BASE); send a path under the imaging root instead",
            )
        if not url_allowed:
            raise FileCheckError(
                "claim-check", f"{field}.uri",
                "must be a file under the imaging root: the normalizer reads it, and URLs are accepted for DICOM only",
            )
        prefix = base if base.endswith("/") else base + "/"
        if not uri.startswith(prefix) or "/../" in uri[len(prefix) - 1:] or uri.endswith("/.."):
            raise FileCheckError(
                "claim-check", f"{field}.uri", f"{uri!r:.200} is not under the configured DICOMweb base {prefix!r}"
            )
        return Resolved(_facts(claim, verified=False), None)
    if config.root is None:
        raise FileCheckError(
            "claim-check", f"{field}.uri", "no imaging root is configured (ONCOTWIN_IMAGING_ROOT): claim checks cannot be resolved"
        )
    root = Path(config.root).resolve()
    if lowered.startswith("file:"):
        try:
            parsed = urllib.parse.urlparse(uri)
        except ValueError:  # "Invalid IPv6 URL": an unclosed '[' in the host part
            raise FileCheckError("claim-check", f"{field}.uri", "is not a well-formed file: URI (its host part is broken)") from None
        if parsed.netloc not in ("", "localhost"):
            raise FileCheckError("claim-check", f"{field}.uri", f"file URI on another host ({parsed.netloc!r}) is not readable here")
        candidate = Path(urllib.parse.unquote(parsed.path))
    else:
        if uri.startswith(("/", "\\")) or "\\" in uri or (len(uri) > 1 and uri[1] == ":"):
            raise FileCheckError("claim-check", f"{field}.uri", f"{uri!r:.200} must be a path relative to the imaging root")
        candidate = root / uri
    if "\x00" in str(candidate):
        # The operating system cannot look such a name up at all (Python raises ValueError).
        raise FileCheckError(
            "claim-check", f"{field}.uri", "holds a NUL character (U+0000, or %00 in a file: URI), which no file name can hold"
        )
    parts = Path(uri if not lowered.startswith("file:") else candidate).parts
    if ".." in parts:
        raise FileCheckError("claim-check", f"{field}.uri", f"{uri!r:.200} has a '..' segment: claim checks must stay under the imaging root")
    # Lexically inside the root first (an absolute file: path elsewhere), then for real (symlinks).
    if not _inside(Path(os.path.abspath(candidate)), root):
        raise FileCheckError("claim-check", f"{field}.uri", f"{uri!r:.200} is outside the imaging root {str(root)!r}")
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise FileCheckError("claim-check", f"{field}.uri", f"{uri!r:.200} does not exist under the imaging root") from None
    except (OSError, RuntimeError) as exc:
        raise FileCheckError("claim-check", f"{field}.uri", f"{uri!r:.200} cannot be resolved ({type(exc).__name__})") from None
    if not _inside(real, root):
        raise FileCheckError(
            "claim-check", f"{field}.uri", f"{uri!r:.200} is a symbolic link (or under one) whose target leaves the imaging root"
        )
    try:
        info = real.stat()
        if not stat.S_ISREG(info.st_mode):
            raise FileCheckError("claim-check", f"{field}.uri", f"{uri!r:.200} is not a regular file")
        if info.st_size != int(claim["size"]):
            raise FileCheckError(
                "claim-check", f"{field}.size", f"the file has {info.st_size} bytes, the claim check says {claim['size']}"
            )
        digest = _sha256(real, info)
    except OSError as exc:  # e.g. no permission to read it, or it vanished since resolve
        raise FileCheckError("claim-check", f"{field}.uri", f"{uri!r:.200} cannot be read ({type(exc).__name__})") from None
    if digest != str(claim["sha256"]).lower():
        raise FileCheckError(
            "claim-check", f"{field}.sha256", f"the file's SHA-256 is {digest}, the claim check says {claim['sha256']}"
        )
    return Resolved(_facts(claim, verified=True), real)


def _inside(path: Path, root: Path) -> bool:
    """``path == root or root in path.parents``, without building every parent: the parents
    of a path are the prefixes of its parts, down to its anchor ("/") or, for a relative one,
    to "." (no parts). A test holds the two to agreement."""
    head = root.parts
    return path.parts[: len(head)] == head and (bool(head) or not (path.drive or path.root))


def _facts(claim: Mapping[str, Any], *, verified: bool) -> ClaimCheckFacts:
    return ClaimCheckFacts(
        uri=str(claim["uri"]),
        sha256=str(claim["sha256"]).lower(),
        size=int(claim["size"]),
        format=claim.get("format"),
        content=claim.get("content"),
        verified=verified,
    )


class _LruCache:
    """A small thread-safe LRU map (file digests and derived measures by content)."""

    def __init__(self, capacity: int) -> None:
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)


_DIGESTS = _LruCache(4096)
_MEASURES = _LruCache(1024)


def _sha256(path: Path, info: os.stat_result) -> str:
    # Keyed by identity and modification time: a rewritten file is hashed again.
    key = (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    cached = _DIGESTS.get(key)
    if cached is not None:
        return str(cached)
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    _DIGESTS.put(key, digest)
    return digest


# -- DICOM ----------------------------------------------------------------------------------

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_SEQUENCE_DELIMITER_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_SEQUENCE_DELIMITER_BE = b"\xff\xfe\xe0\xdd\x00\x00\x00\x00"


def check_dicom(path: Path, body: Mapping[str, Any], occurred_at: datetime, now: datetime, field: str, skew: timedelta) -> None:
    """Check a DICOM file's header against the imaging event (raises FileCheckError)."""
    import pydicom  # noqa: PLC0415
    from pydicom.errors import InvalidDicomError  # noqa: PLC0415

    try:
        with path.open("rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            pixel_offset = f.tell()
    except InvalidDicomError as exc:
        raise FileCheckError("dicom", field, f"not a DICOM Part 10 file: {str(exc)[:200]}") from None
    except Exception as exc:  # noqa: BLE001  (any parse failure: the file is broken)
        # The exception text may quote element values: only its type is reported.
        raise FileCheckError("dicom", field, f"the DICOM header cannot be parsed ({type(exc).__name__})") from None

    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax:
        raise FileCheckError("dicom", field, "the file has no File Meta Information (TransferSyntaxUID): not a DICOM Part 10 file")

    def text(keyword: str) -> str:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001  (an undecodable element counts as missing)
            return ""
        return str(value).strip() if value is not None else ""

    modality = text("Modality")
    if modality != body["modality"]:
        shown = repr(modality) if modality else "no Modality (0008,0060)"
        raise FileCheckError("dicom", f"{field} (0008,0060)", f"the DICOM file has {shown}, the event says {body['modality']!r}")
    for keyword, tag, key in (
        ("StudyInstanceUID", "(0020,000D)", "study_uid"),
        ("SeriesInstanceUID", "(0020,000E)", "series_uid"),
    ):
        if key not in body:
            continue  # a study named by its study UID alone: any of its series is the study's
        value = text(keyword)
        if value != body[key]:
            shown = repr(value) if value else f"no {keyword}"
            raise FileCheckError("dicom", f"{field} {tag}", f"the DICOM file has {shown}, the event's body.{key} is {body[key]!r}")
    _check_dates(text, occurred_at, now, field, skew)
    _check_pixel_data(path, ds, syntax, pixel_offset, field)


def _check_dates(text: Any, occurred_at: datetime, now: datetime, field: str, skew: timedelta) -> None:
    latest = (now + skew).date()
    for keyword, tag in (
        ("StudyDate", "(0008,0020)"),
        ("SeriesDate", "(0008,0021)"),
        ("AcquisitionDate", "(0008,0022)"),
        ("ContentDate", "(0008,0023)"),
    ):
        raw = text(keyword)
        if not raw:
            continue
        try:
            day = date(int(raw[0:4]), int(raw[4:6]), int(raw[6:8])) if len(raw) == 8 and raw.isdigit() else None
        except ValueError:
            day = None
        if day is None:
            raise FileCheckError("dicom", f"{field} {tag}", f"{keyword} {raw!r:.20} is not a valid date (YYYYMMDD)")
        if day.year < OLDEST_DICOM_YEAR or day > latest:
            raise FileCheckError("dicom", f"{field} {tag}", f"{keyword} {day.isoformat()} is not a plausible scan date")
        if keyword == "StudyDate":
            event_day = occurred_at.date()
            if abs(day - event_day) > STUDY_DATE_TOLERANCE:
                raise FileCheckError(
                    "dicom", f"{field} {tag}",
                    f"StudyDate {day.isoformat()} does not match the event's occurred_at ({event_day.isoformat()}, within one day)",
                )


def _check_pixel_data(path: Path, ds: Any, syntax: str, offset: int, field: str) -> None:
    size = path.stat().st_size
    if syntax == _DEFLATED:
        return  # the data set is compressed as a whole: element offsets are not file offsets
    with path.open("rb") as f:
        f.seek(offset)
        head = f.read(12)
        if len(head) < 8:
            raise FileCheckError("dicom", f"{field} (7FE0,0010)", "the file has no pixel data: a scan must hold its image")
        big = syntax == _EXPLICIT_BE
        order = ">" if big else "<"
        group, element = struct.unpack(order + "HH", head[:4])
        if (group, element) not in _PIXEL_TAGS:
            raise FileCheckError("dicom", f"{field} (7FE0,0010)", "the header does not end at the pixel data: the file is corrupt")
        if syntax == _IMPLICIT_LE:
            (length,) = struct.unpack("<I", head[4:8])
            header_len = 8
        elif head[4:6] in _LONG_VRS:
            if len(head) < 12:
                raise FileCheckError("dicom", f"{field} (7FE0,0010)", "the file ends inside the pixel data element header (truncated)")
            (length,) = struct.unpack(order + "I", head[8:12])
            header_len = 12
        else:
            (length,) = struct.unpack(order + "H", head[6:8])
            header_len = 8
        if length == 0xFFFFFFFF:
            f.seek(max(0, size - 8))
            tail = f.read(8)
            if tail not in (_SEQUENCE_DELIMITER_LE, _SEQUENCE_DELIMITER_BE):
                raise FileCheckError(
                    "dicom", f"{field} (7FE0,0010)",
                    "the encapsulated pixel data is not terminated by a sequence delimiter: the file is truncated",
                )
            return
    available = size - offset - header_len
    if length > available:
        raise FileCheckError(
            "dicom", f"{field} (7FE0,0010)",
            f"the pixel data element declares {length} bytes but the file holds {available}: the file is truncated",
        )
    expected = _native_pixel_bytes(ds)
    if expected is not None and length < expected:
        raise FileCheckError(
            "dicom", f"{field} (7FE0,0010)",
            f"the pixel data holds {length} bytes, the image header describes {expected} (rows x columns x samples x frames)",
        )


def _native_pixel_bytes(ds: Any) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001  (no image pixel module: nothing to compare)
        return None
    if bits == 1:
        return math.ceil(rows * cols * samples * frames / 8)
    return rows * cols * samples * frames * math.ceil(bits / 8)


# -- NIfTI ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeMeasures:
    volume_ml: float | None
    centroid_mm: tuple[float, float, float] | None
    labels: tuple[tuple[int, str], ...] | None = None  # a segmentation's (label, meaning), by label
    label_convention: str | None = None  # explicit, brats, binary or soft (segmentation_labels)


def segmentation_labels(
    data: np.ndarray, explicit: Mapping[int, str] | None, field: str = "body.segmentation_uri"
) -> tuple[np.ndarray, tuple[tuple[int, str], ...] | None, str]:
    """(tumour mask [X, Y, Z] bool, ((label, meaning), ...) or None, convention) of a segmentation.

    A map of integers (or of floats that are all integral) is a label map: with ``explicit``
    (the event's segmentation_labels) every label it holds must be listed there, 0 aside (the
    background unless listed otherwise) -> "explicit"; without, one positive label is a plain
    tumour mask -> "binary", positive labels among 1 to 4 follow BRATS_LABELS -> "brats", and
    any other map is refused. Any other float map is a soft mask, tumour from
    SOFT_MASK_THRESHOLD -> "soft" (and refuses ``explicit``: a soft mask has no labels). The
    tumour mask is the union of the tumour labels. Raises FileCheckError (stage nifti) naming
    the field at fault."""
    if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
        if explicit:
            raise FileCheckError(
                "nifti", "body.segmentation_labels",
                "the segmentation is a soft mask (values that are not integers), which has no labels to map: "
                "send an integer label map or leave segmentation_labels out",
            )
        return data >= SOFT_MASK_THRESHOLD, None, "soft"
    labels = data.astype(np.int64, copy=False)
    found = _labels_in(labels)
    if explicit:
        listed = {int(k): str(v) for k, v in explicit.items()}
        unlisted = sorted(found - set(listed) - {0})
        if unlisted:
            raise FileCheckError(
                "nifti", "body.segmentation_labels",
                f"the segmentation holds label(s) {unlisted[:10]} that segmentation_labels does not list "
                f"(it lists {sorted(listed)[:20]}): every label of the map must say what it means",
            )
        meanings = {0: "background", **listed} if 0 not in listed else listed
        convention = "explicit"
    else:
        positive = sorted(found - {0})
        if len(positive) <= 1:
            meanings = {0: "background", **{label: "tumor" for label in positive}}
            convention = "binary"
        elif set(positive) <= set(BRATS_LABELS):
            meanings = {0: "background", **{label: BRATS_LABELS[label] for label in positive}}
            convention = "brats"
        else:
            raise FileCheckError(
                "nifti", field,
                f"the segmentation holds the labels {positive[:10]}: several tumour labels outside the BraTS "
                "convention (1 necrosis, 2 oedema, 3 or 4 enhancing); send segmentation_labels to say what each means",
            )
    tumour = sorted(label for label, meaning in meanings.items() if meaning in TUMOUR_MEANINGS)
    return np.isin(labels, tumour), tuple(sorted(meanings.items())), convention


def _labels_in(labels: np.ndarray) -> set[int]:
    """The distinct labels of a non-negative integer map (bincount: one pass, no sort)."""
    if labels.size == 0:
        return set()
    top = int(labels.max())
    if top <= 1 << 20:
        return {int(v) for v in np.flatnonzero(np.bincount(labels.ravel(), minlength=1))}
    return {int(v) for v in np.unique(labels)}


def measure_nifti(
    path: Path, digest: str, content: str, spacing_mm: tuple[float, float, float], field: str,
    labels: Mapping[int, str] | None = None,
) -> VolumeMeasures:
    """Volume (mL, segmentations only: its tumour labels, see ``segmentation_labels``, which
    ``labels`` is passed to) and centroid (mm) of a segmentation or density map."""
    key = (digest, content, spacing_mm, tuple(sorted(labels.items())) if labels else None)
    cached = _MEASURES.get(key)
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    import nibabel as nib  # noqa: PLC0415

    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001  (unreadable or truncated image)
        raise FileCheckError("nifti", field, f"not a readable NIfTI image ({type(exc).__name__}: {str(exc)[:160]})") from None
    if data.ndim != 3 or min(data.shape) < 1:
        raise FileCheckError("nifti", field, f"expected a 3-D volume, got shape {tuple(data.shape)}")
    if len(zooms) != 3 or not all(math.isclose(a, b, rel_tol=_SPACING_RTOL) for a, b in zip(zooms, spacing_mm)):
        raise FileCheckError(
            "nifti", field, f"voxel spacing {zooms} mm differs from the event's body.voxel_spacing_mm {list(spacing_mm)}"
        )
    values = data.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise FileCheckError("nifti", field, "the image holds NaN or infinite values")
    if (values < 0).any():
        raise FileCheckError("nifti", field, "the image holds negative values (a mask or density is >= 0)")
    found_labels = convention = None
    if content == "density":
        if (values > 1.0 + 1e-6).any():
            raise FileCheckError("nifti", field, "a density (cellularity) map holds fractions within [0, 1]; found values above 1")
        weights = values
        volume = None
    else:
        mask, found_labels, convention = segmentation_labels(values if data.dtype.kind == "f" else data, labels, field)
        weights = mask.astype(np.float64)
        # The product of the voxel sizes (pixdim) is exact where the determinant is not.
        voxel_ml = float(np.prod(zooms)) / 1000.0
        volume = float(mask.sum()) * voxel_ml
    total = float(weights.sum())
    centroid: tuple[float, float, float] | None = None
    if total > 0:
        ijk = np.array(
            [float((weights.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(data.shape[axis])).sum()) / total for axis in range(3)]
        )
        xyz = affine[:3, :3] @ ijk + affine[:3, 3]
        centroid = (float(xyz[0]), float(xyz[1]), float(xyz[2]))
    result = VolumeMeasures(volume, centroid, found_labels, convention)
    _MEASURES.put(key, result)
    return result


# -- an event's files -----------------------------------------------------------------------


# What an event without claim checks yields (most events): frozen, so one instance serves all.
_NO_FILES = FileFacts()


def file_facts(event: Mapping[str, Any], config: ImagingConfig, now: datetime, occurred_at: datetime) -> FileFacts:
    """Resolve, verify and read every claim check of an imaging or surgery event."""
    body = event["body"]
    if event["kind"] == "treatment":
        claim = body.get("resection_mask_uri")
        if claim is None:
            return _NO_FILES
        mask = resolve(claim, "body.resection_mask_uri", config, url_allowed=False)
        return FileFacts(resection_mask=mask.facts)
    if event["kind"] != "imaging":
        return _NO_FILES
    spacing = tuple(float(v) for v in body["voxel_spacing_mm"])
    dicom_facts = seg_facts = density_facts = None
    volume = centroid = centroid_source = labels = convention = None
    if body.get("dicom_uri") is not None:
        dicom = resolve(body["dicom_uri"], "body.dicom_uri", config, url_allowed=True)
        dicom_facts = dicom.facts
        if dicom.path is not None and body["dicom_uri"].get("format", "dicom") in ("dicom", "dicom-seg"):
            check_dicom(dicom.path, body, occurred_at, now, "body.dicom_uri", config.future_skew)
    if body.get("segmentation_uri") is not None:
        seg = resolve(body["segmentation_uri"], "body.segmentation_uri", config, url_allowed=False)
        seg_facts = seg.facts
        assert seg.path is not None
        fmt = body["segmentation_uri"].get("format", "nifti")
        if fmt != "nifti":
            raise FileCheckError("nifti", "body.segmentation_uri.format", f"only NIfTI segmentations are read, not {fmt!r}")
        measures = measure_nifti(
            seg.path, seg.facts.sha256, "segmentation", spacing, "body.segmentation_uri",  # type: ignore[arg-type]
            labels=body.get("segmentation_labels"),
        )
        volume, centroid = measures.volume_ml, measures.centroid_mm
        labels, convention = measures.labels, measures.label_convention
        centroid_source = "segmentation" if centroid is not None else None
    density_claim = body.get("measures", {}).get("cellularity_map_uri")
    if density_claim is not None:
        density = resolve(density_claim, "body.measures.cellularity_map_uri", config, url_allowed=False)
        density_facts = density.facts
        assert density.path is not None
        measures = measure_nifti(density.path, density.facts.sha256, "density", spacing, "body.measures.cellularity_map_uri")  # type: ignore[arg-type]
        if centroid is None and measures.centroid_mm is not None:
            centroid, centroid_source = measures.centroid_mm, "density"
    tissue_claim = body.get("measures", {}).get("tissue_map_uri")
    tissue_facts = None
    if tissue_claim is not None:
        # Verified (inside the root, size and sha256) here; its labels are read by the worker.
        tissue_facts = resolve(tissue_claim, "body.measures.tissue_map_uri", config, url_allowed=False).facts
    return FileFacts(
        volume_ml=volume,
        centroid_mm=centroid,
        centroid_source=centroid_source,
        dicom=dicom_facts,
        segmentation=seg_facts,
        density_map=density_facts,
        tissue_map=tissue_facts,
        segmentation_labels=labels,
        label_convention=convention,
    )
