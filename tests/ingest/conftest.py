"""Fixtures of the ingestion tests: broker, virtual cohort, DICOM test files, the mCODE package.

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
    package_dir = FHIR_CACHE / "hl7.fhir.us.mcode-4.0.0"
    examples = package_dir / "package" / "example"
    if examples.is_dir() and any(examples.glob("Observation-*.json")):
        return examples
    FHIR_CACHE.mkdir(parents=True, exist_ok=True)
    tarball = FHIR_CACHE / "hl7.fhir.us.mcode-4.0.0.tgz"
    if not tarball.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot fetch the mCODE package")
        try:
            done = subprocess.run(
                [npm, "pack", MCODE_PACKAGE, "--pack-destination", str(FHIR_CACHE)],
                capture_output=True, text=True, timeout=180, cwd=FHIR_CACHE,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("the npm registry did not answer within 180 s")
        if done.returncode != 0 or not tarball.exists():
            pytest.skip(f"npm pack {MCODE_PACKAGE} failed (registry unreachable?): {done.stderr.strip()[-300:]}")
    package_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as archive:
        archive.extractall(package_dir, filter="data")
    return examples
