"""Volumes on disk (NIfTI) and their claim checks (relative URI, sha256, size).

Pixels never travel through Kafka: an imaging event carries a claim check that a reader resolves
under a configured root and verifies by hash before use.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def nifti_bytes(array: np.ndarray, spacing_mm: tuple[float, float, float], *, compress: bool = True) -> bytes:
    """A 3-D (or 4-D: volumes along the last axis) NIfTI-1 image with an RAS affine of the given
    voxel spacing (mm). Gzip runs with mtime=0: the same array always gives the same bytes."""
    affine = np.diag([*map(float, spacing_mm), 1.0])
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.header.set_xyzt_units("mm", "sec")
    raw = image.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


def write_nifti(path: Path, array: np.ndarray, spacing_mm: tuple[float, float, float]) -> None:
    """Write a volume (see nifti_bytes) to path, write-then-rename; gzipped for *.gz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = nifti_bytes(array, spacing_mm, compress=path.name.endswith(".gz"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(path)


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(array, voxel spacing in mm) of a NIfTI file."""
    image = nib.load(str(path))
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    return np.asanyarray(image.dataobj), spacing  # type: ignore[return-value]


def claim_check(path: Path, root: Path, **extra: str) -> dict:
    """The claim check for a file under root: {uri (relative, POSIX), sha256, size, ...extra}."""
    path, root = Path(path), Path(root)
    return {
        "uri": path.resolve().relative_to(root.resolve()).as_posix(),
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        **extra,
    }
