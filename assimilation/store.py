"""The twin state store: snapshots, the per-patient observation journal and pending observations,
kept as objects under keys in a backend addressed by URL.

A backend only needs four operations, ``put_bytes / get_bytes / list / delete`` on string
keys: ``file://`` directories, ``s3://`` buckets (``assimilation.s3``: AWS S3, MinIO, SeaweedFS;
workers on several machines share twins through one) and ``memory://``. Every object is one safetensors blob
whose header metadata carries the JSON description, so an object is written in one piece:
``FileBackend.put_bytes`` writes a temporary file beside the target and renames it over the
target (atomic on POSIX), and an S3 PUT is atomic by nature. A reader never sees a partial
snapshot.

Layout (``{pid}`` and ``{id}`` percent-encoded):

    twins/{pid}/snapshots/{clock in ms since the twin's epoch}.safetensors
    twins/{pid}/journal/{event id}.safetensors      every applied observation, compact form
    twins/{pid}/pending/{event id}.safetensors      observations waiting for the first study
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlparse

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.grid import Grid
from models.priors import LogNormal, TumorPrior

from .calibration import PredictiveCheck
from .observations import (
    CtdnaObservation,
    ImagingObservation,
    MarkerObservation,
    ObservationBase,
    TreatmentEvent,
)
from .operators import CompactImaging
from .twin import PatientTwin, TreatmentRecord

__all__ = [
    "Backend",
    "FileBackend",
    "MemoryBackend",
    "RetentionPolicy",
    "StateStore",
    "decode_observation",
    "decode_twin",
    "encode_observation",
    "encode_twin",
    "open_backend",
]

TWIN_FORMAT = "oncotwin-twin/1"
OBSERVATION_FORMAT = "oncotwin-observation/1"
_META_KEY = "oncotwin"


class Backend(Protocol):
    """Object storage by key. ``list(prefix)`` returns the keys starting with ``prefix``, sorted."""

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...


class FileBackend:
    """Keys are relative paths under ``root``; writes are write-temp-then-rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid key {key!r}")
        return self.root / key

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temporary file lives in the target's directory (same file system, so the rename
        # is atomic) and starts with "." so that list() never reports it.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.exists():
            return []
        keys = []
        for p in base.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class MemoryBackend:
    """A dict: for tests and for throw-away runs."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def open_backend(url: str | Path) -> Backend:
    """``file:///abs/dir`` (or a plain path) -> FileBackend; ``s3://bucket/prefix`` -> S3Backend
    (see ``assimilation.s3`` for its options); ``memory://`` -> MemoryBackend."""
    text = str(url)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return FileBackend(unquote(parsed.netloc + parsed.path))
    if parsed.scheme == "s3":
        from .s3 import S3Backend  # noqa: PLC0415

        return S3Backend.from_url(text)
    if parsed.scheme == "memory":
        return MemoryBackend()
    if parsed.scheme == "":
        return FileBackend(text)
    raise ValueError(f"unsupported state store URL {text!r} (file://, s3:// or memory://)")


# --- encoding ---------------------------------------------------------------------------------

def _pack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})


def _unpack(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = json.loads(header.get("__metadata__", {}).get(_META_KEY, "{}"))
    return st_load(data), meta


def _prior_to_json(prior: TumorPrior) -> dict[str, Any]:
    return asdict(prior)


def _prior_from_json(d: dict[str, Any]) -> TumorPrior:
    return TumorPrior(**{k: LogNormal(**v) if isinstance(v, dict) else v for k, v in d.items()})


def encode_twin(twin: PatientTwin) -> bytes:
    """One safetensors blob: u, log_params, tissue; everything else as JSON metadata."""
    meta = {
        "format": TWIN_FORMAT,
        "patient_id": twin.patient_id,
        "epoch": twin.epoch.isoformat(),
        "grid": {"shape": list(twin.grid.shape), "spacing_mm": list(twin.grid.spacing)},
        "clock": twin.clock,
        "prior": _prior_to_json(twin.prior),
        "origin_event_id": twin.origin_event_id,
        "started_at": twin.started_at,
        "last_analysis": twin.last_analysis,
        "treatments": [asdict(r) for r in twin.treatments],
        "applied": list(twin.applied),
        "marker_code": twin.marker_code,
        "marker_unit": twin.marker_unit,
        "model_version": twin.model_version,
        "filter_version": twin.filter_version,
        "n_analyses": twin.n_analyses,
        "checks": [asdict(c) for c in twin.checks],
        "data_time": None if twin.data_time is None else twin.data_time.isoformat(),
    }
    tensors = {"u": twin.u, "log_params": twin.log_params, "tissue": twin.tissue.to(torch.uint8)}
    return _pack(tensors, meta)


def decode_twin(data: bytes, device: torch.device | str | None = None) -> PatientTwin:
    tensors, meta = _unpack(data)
    if meta.get("format") != TWIN_FORMAT:
        raise ValueError(f"not a twin snapshot (format {meta.get('format')!r})")
    return PatientTwin(
        patient_id=meta["patient_id"],
        epoch=datetime.fromisoformat(meta["epoch"]),
        grid=Grid(tuple(meta["grid"]["shape"]), tuple(meta["grid"]["spacing_mm"])),
        tissue=tensors["tissue"].to(device=device, dtype=torch.int64),
        u=tensors["u"].to(device),
        log_params=tensors["log_params"].to(device),
        clock=float(meta["clock"]),
        prior=_prior_from_json(meta["prior"]),
        origin_event_id=meta["origin_event_id"],
        started_at=float(meta["started_at"]),
        last_analysis=None if meta["last_analysis"] is None else float(meta["last_analysis"]),
        treatments=tuple(TreatmentRecord(**r) for r in meta["treatments"]),
        applied=tuple(meta["applied"]),
        marker_code=meta["marker_code"],
        marker_unit=meta["marker_unit"],
        model_version=meta["model_version"],
        filter_version=meta["filter_version"],
        n_analyses=int(meta["n_analyses"]),
        checks=tuple(PredictiveCheck(**c) for c in meta.get("checks", ())),  # absent before checks existed
        data_time=datetime.fromisoformat(meta["data_time"]) if meta.get("data_time") else None,
    )


_OBSERVATION_TYPES = {cls.__name__: cls for cls in (ImagingObservation, MarkerObservation, CtdnaObservation,
                                                     TreatmentEvent, CompactImaging)}


def encode_observation(obs: ObservationBase) -> bytes:
    """Any typed observation (or CompactImaging): arrays as tensors, the rest as JSON."""
    name = type(obs).__name__
    if name not in _OBSERVATION_TYPES:
        raise TypeError(f"cannot store a {name}")
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for f in fields(obs):
        v = getattr(obs, f.name)
        if isinstance(v, np.ndarray):
            tensors[f.name] = torch.from_numpy(np.ascontiguousarray(v).copy())
        elif isinstance(v, torch.Tensor):
            tensors[f.name] = v
        elif isinstance(v, datetime):
            values[f.name] = {"datetime": v.isoformat()}
        else:
            values[f.name] = v
    return _pack(tensors, {"format": OBSERVATION_FORMAT, "type": name, "fields": values})


def decode_observation(data: bytes) -> ObservationBase:
    tensors, meta = _unpack(data)
    if meta.get("format") != OBSERVATION_FORMAT:
        raise ValueError(f"not a stored observation (format {meta.get('format')!r})")
    kwargs: dict[str, Any] = dict(tensors)
    for k, v in meta["fields"].items():
        if isinstance(v, dict) and set(v) == {"datetime"}:
            v = datetime.fromisoformat(v["datetime"])
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return _OBSERVATION_TYPES[meta["type"]](**kwargs)


# --- the store --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionPolicy:
    """Snapshots kept per patient: the newest ``keep_last`` and every one whose clock is within
    ``keep_days`` of the newest (None disables that rule; both None keeps everything). The
    newest snapshot is always kept. Deleting old snapshots costs only replay time: a late event
    older than every snapshot is re-analysed from the journal."""

    keep_last: int | None = 10
    keep_days: float | None = 90.0


def _pid(patient_id: str) -> str:
    # "." is encoded too, so no name can start with one (FileBackend hides dot-files).
    return quote(patient_id, safe="-_")


class StateStore:
    """Snapshots, journal and pending observations of every twin, in one backend."""

    def __init__(self, backend: Backend | str | Path, retention: RetentionPolicy | None = None) -> None:
        self.backend = backend if hasattr(backend, "put_bytes") else open_backend(backend)  # type: ignore[arg-type]
        self.retention = retention or RetentionPolicy()

    # snapshots
    @staticmethod
    def _clock_ms(days: float) -> int:
        return round(days * 86_400_000)

    def snapshot_key(self, patient_id: str, clock: float) -> str:
        return f"twins/{_pid(patient_id)}/snapshots/{self._clock_ms(clock)}.safetensors"

    def save(self, twin: PatientTwin) -> str:
        """Write the twin as the snapshot of its clock (replacing one at the same clock)."""
        key = self.snapshot_key(twin.patient_id, twin.clock)
        self.backend.put_bytes(key, encode_twin(twin))
        return key

    def load(self, key: str, device: torch.device | str | None = None) -> PatientTwin:
        return decode_twin(self.backend.get_bytes(key), device)

    def snapshots(self, patient_id: str) -> list[tuple[float, str]]:
        """(clock in days, key) of every snapshot of a patient, oldest first."""
        out = []
        for key in self.backend.list(f"twins/{_pid(patient_id)}/snapshots/"):
            stem = key.rsplit("/", 1)[-1].removesuffix(".safetensors")
            try:
                out.append((int(stem) / 86_400_000, key))
            except ValueError:
                continue
        return sorted(out)

    def latest(self, patient_id: str, device: torch.device | str | None = None) -> PatientTwin | None:
        snaps = self.snapshots(patient_id)
        return self.load(snaps[-1][1], device) if snaps else None

    def snapshot_before(self, patient_id: str, t_days: float,
                        device: torch.device | str | None = None) -> PatientTwin | None:
        """The newest snapshot whose clock is strictly before ``t_days`` (days since the
        twin's epoch), or None."""
        limit = self._clock_ms(t_days)
        before = [key for clock, key in self.snapshots(patient_id) if self._clock_ms(clock) < limit]
        return self.load(before[-1], device) if before else None

    def apply_retention(self, patient_id: str) -> list[str]:
        """Delete the snapshots the policy no longer keeps; returns their keys."""
        snaps = self.snapshots(patient_id)
        policy = self.retention
        if not snaps or (policy.keep_last is None and policy.keep_days is None):
            return []
        newest = snaps[-1][0]
        keep = {snaps[-1][1]}
        if policy.keep_last is not None:
            keep.update(key for _, key in snaps[-max(policy.keep_last, 1):])
        if policy.keep_days is not None:
            keep.update(key for clock, key in snaps if clock >= newest - policy.keep_days)
        dropped = [key for _, key in snaps if key not in keep]
        for key in dropped:
            self.backend.delete(key)
        return dropped

    # journal and pending observations
    def _obs_key(self, patient_id: str, area: str, event_id: str) -> str:
        return f"twins/{_pid(patient_id)}/{area}/{quote(event_id, safe='-_')}.safetensors"

    def _put(self, area: str, observations: Iterable[ObservationBase]) -> None:
        for o in observations:
            self.backend.put_bytes(self._obs_key(o.patient_id, area, o.event_id), encode_observation(o))

    def _get(self, patient_id: str, area: str) -> list[ObservationBase]:
        out = [decode_observation(self.backend.get_bytes(k))
               for k in self.backend.list(f"twins/{_pid(patient_id)}/{area}/")]
        return sorted(out, key=lambda o: (o.time, o.event_id))

    def journal_put(self, observations: Iterable[ObservationBase]) -> None:
        """Record applied observations (idempotent: one object per event id)."""
        self._put("journal", observations)

    def journal(self, patient_id: str) -> list[ObservationBase]:
        """Every journaled observation of a patient, in (time, event id) order."""
        return self._get(patient_id, "journal")

    def pending_put(self, observations: Iterable[ObservationBase]) -> None:
        self._put("pending", observations)

    def pending(self, patient_id: str) -> list[ObservationBase]:
        return self._get(patient_id, "pending")

    def pending_clear(self, patient_id: str) -> None:
        for key in self.backend.list(f"twins/{_pid(patient_id)}/pending/"):
            self.backend.delete(key)

    def patients(self) -> list[str]:
        """Patient ids with anything stored."""
        ids = {unquote(k.split("/")[1]) for k in self.backend.list("twins/") if k.count("/") >= 2}
        return sorted(ids)
