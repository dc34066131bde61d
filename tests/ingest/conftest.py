"""Fixtures of the ingestion tests: broker, virtual cohort, DICOM test files, official FHIR packages.

The broker is the embedded tansu broker (or KAFKA_BOOTSTRAP_SERVERS with
ONCOTWIN_TEST_KAFKA=external); integration modules run one normalizer worker each, on topics
of their own prefix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest



MCODE_PACKAGE = "hl7.fhir.us.mcode@4.0.0"
FHIR_CACHE = Path(os.environ.get("ONCOTWIN_FHIR_CACHE", Path.home() / ".cache" / "oncotwin" / "fhir"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs a Kafka-protocol broker (embedded tansu by default)")




# -- virtual cohort -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-patient virtual cohort (events.jsonl + NIfTI files) under its own root."""
    from models import Grid  # noqa: PLC0415
    from models.virtual_patient import CohortConfig, generate_cohort  # noqa: PLC0415
    from stream.virtual_feed import write_cohort  # noqa: PLC0415

    root = tmp_path_factory.mktemp("cohort")
    config = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=120, truth_margin_days=10)
    write_cohort(generate_cohort(1, seed=1, config=config), root)
    return root


@pytest.fixture(scope="session")
def cohort_events(cohort: Path) -> list[dict]:
    from stream.eventlog import read_events  # noqa: PLC0415

    return read_events(cohort / "events.jsonl")


# -- DICOM ----------------------------------------------------------------------------------






# -- mCODE ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mcode_examples() -> Path:
    """The example folder of the official mCODE 4.0.0 package (npm pack into a cache)."""
    return _fhir_package(MCODE_PACKAGE, "package/example")


@pytest.fixture(scope="session")
def genomics_examples() -> Path:
    """The example folder of the official HL7 Genomics Reporting IG 3.0.0 package."""
    return _fhir_package("hl7.fhir.uv.genomics-reporting@3.0.0", "package/example")


@pytest.fixture(scope="session")
def r4_observation_examples() -> Path:
    """The Observation examples of the official FHIR R4 examples package (4.0.1): 18.8 MB, of
    which only the Observation-*.json files are unpacked."""
    return _fhir_package("hl7.fhir.r4.examples@4.0.1", "package", members="package/Observation-")


@pytest.fixture(scope="session")
def r4_medication_administration_examples() -> Path:
    """The MedicationAdministration examples of the same FHIR R4 examples package."""
    return _fhir_package("hl7.fhir.r4.examples@4.0.1", "package", members="package/MedicationAdministration-")


def _fhir_package(spec: str, examples: str, members: str | None = None) -> Path:
    """``examples`` (a folder) of the npm package ``spec`` (name@version), packed into
    FHIR_CACHE once and unpacked there (only the members starting with ``members``, if given).
    Skips when npm or the registry is unavailable."""
    name, version = spec.split("@")
    package_dir = FHIR_CACHE / f"{name}-{version}"
    folder = package_dir / examples
    wanted = (members.rsplit("/", 1)[-1] if members else "Observation-") + "*.json"
    if folder.is_dir() and any(folder.glob(wanted)):
        return folder
    FHIR_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = FHIR_CACHE / f"{name}-{version}.tgz"
    if not tarball.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"npm is not installed: cannot fetch {spec}")
        try:
            done = subprocess.run(
                [npm, "pack", spec, "--pack-destination", str(FHIR_CACHE)],
                capture_output=True, text=True, timeout=180, cwd=FHIR_CACHE,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("the npm registry did not answer within 180 s")
        if done.returncode != 0 or not tarball.exists():
            pytest.skip(f"npm pack {spec} failed (registry unreachable?): {done.stderr.strip()[-300:]}")
    package_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as archive:
        chosen = [m for m in archive.getmembers() if members is None or m.name.startswith(members)]
        archive.extractall(package_dir, members=chosen, filter="data")
    return folder
