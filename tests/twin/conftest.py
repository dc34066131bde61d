"""Fixtures for the twin tests: a few CI-sized virtual patients (16³ voxels of 5 mm, 200 days
observed, truth kept 100 days beyond) and their observations as typed events."""

from __future__ import annotations

import pytest
import torch

from models.virtual_patient import VirtualPatient, generate_patient
from twin_support import COHORT, typed_observations


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    # Four developers share two cores: keep intra-op threads from oversubscribing them.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def patients() -> list[VirtualPatient]:
    return [generate_patient(i, 7, COHORT) for i in range(3)]


@pytest.fixture(scope="session")
def patient(patients) -> VirtualPatient:
    return patients[0]


@pytest.fixture(scope="session")
def events(patient):
    return typed_observations(patient)
