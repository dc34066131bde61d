"""Helpers shared by the ingestion tests (a module of its own, not conftest: several test
folders have a conftest, and `from conftest import` would pick whichever was loaded last)."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from stream import KafkaSettings


def module_settings(kafka: KafkaSettings, partitions: int = 3) -> KafkaSettings:
    prefix = f"ingest-{uuid.uuid4().hex[:10]}"
    return replace(kafka, topic_prefix=prefix, consumer_group=f"{prefix}-group", topic_partitions=partitions)


def local_dicom_testdata(pattern: str) -> list[Path]:
    """pydicom's and pydicom-data's local test files matching ``pattern`` (never downloads:
    get_testdata_files would fetch files of the online index that are not installed)."""
    import pydicom.data.data_manager as dm  # noqa: PLC0415

    roots = [Path(dm.DATA_ROOT) / "test_files"]
    for source in dm.external_data_sources().values():
        path = getattr(source, "data_path", None)
        if path is not None:
            roots.append(Path(path))
    return sorted({p for root in roots for p in root.glob(pattern) if p.is_file()})


def dicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file  # noqa: PLC0415

    path = get_testdata_file(name, download=False)
    if path is None:
        found = local_dicom_testdata(name)
        if not found:
            pytest.skip(f"pydicom test file {name} is not installed")
        return found[0]
    return Path(path)


def mcode_observations(examples: Path, profile: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(examples.glob("Observation-*.json")):
        resource = json.loads(path.read_text(encoding="utf-8"))
        profiles = (resource.get("meta") or {}).get("profile") or []
        if any(p.rstrip("/").endswith(profile) for p in profiles):
            out.append((path.name, resource))
    return out
