"""Virtual patients written as a feed: schema-valid, deterministic, faithful to their truth."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from models import Grid
from models.virtual_patient import CohortConfig, generate_cohort
from schemas import parse_time, validate
from stream.eventlog import read_events
from stream.virtual_feed import day0_of, write_cohort
from stream.volumes import read_nifti, sha256_file

CONFIG = CohortConfig(grid=Grid((16, 16, 16), (5.0, 5.0, 5.0)), observe_days=200.0, truth_margin_days=60.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    patients = generate_cohort(2, seed=7, config=CONFIG)
    root = tmp_path_factory.mktemp("cohort")
    return patients, write_cohort(patients, root)


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_event_is_valid_against_the_schemas(cohort):
    _, written = cohort
    events = read_events(written.events_path)
    assert len(events) == written.n_events > 0
    problems = {e["event_id"]: validate(e) for e in events}
    assert {k: v for k, v in problems.items() if v} == {}
    assert {e["kind"] for e in events} == {"imaging", "lab", "ctdna", "treatment"}
    times = [parse_time(e["occurred_at"]) for e in events]
    assert times == sorted(times), "the log is in event-time order"
    assert len({e["event_id"] for e in events}) == len(events)


def test_same_seed_gives_identical_files(cohort, tmp_path):
    _, written = cohort
    again = write_cohort(generate_cohort(2, seed=7, config=CONFIG), tmp_path)
    assert _tree_digest(written.root) == _tree_digest(again.root)
    other = write_cohort(generate_cohort(2, seed=8, config=CONFIG), tmp_path / "other")
    assert other.events_path.read_bytes() != written.events_path.read_bytes()


def test_schedule_is_standard_of_care_on_weekdays(cohort):
    patients, written = cohort
    events = read_events(written.events_path)
    for p in patients:
        rt = [e for e in events if e["patient_id"] == p.pseudonym and e["kind"] == "treatment" and e["body"]["type"] == "radiotherapy"]
        assert len(rt) == 30
        when = [parse_time(e["occurred_at"]) for e in rt]
        assert {t.weekday() for t in when} <= {0, 1, 2, 3, 4}
        assert {(t.hour, t.minute) for t in when} == {(9, 0)}
        assert sum(e["body"]["dose"]["value"] for e in rt) == pytest.approx(60.0)
        assert day0_of(p).weekday() == 0


def test_observation_intervals_are_irregular_within_the_protocol(cohort):
    patients, _ = cohort
    for p in patients:
        mri = [o.t for o in p.observations if o.kind == "imaging"]
        labs = [o.t for o in p.observations if o.kind == "lab"]
        gaps = np.diff(mri)
        assert len(mri) >= 3 and np.all(gaps >= 42 - 1) and np.all(gaps <= 70 + 1)
        lab_gaps = np.diff(labs)
        assert np.all(lab_gaps >= 14 - 1) and np.all(lab_gaps <= 28 + 1)
        assert len(set(np.round(gaps))) > 1, "intervals vary"


def test_imaging_claim_checks_resolve_and_match_their_measures(cohort):
    patients, written = cohort
    root = written.root
    imaging = [e for e in read_events(written.events_path) if e["kind"] == "imaging"]
    assert imaging
    for e in imaging:
        seg = e["body"]["segmentation_uri"]
        path = root / seg["uri"]
        assert sha256_file(path) == seg["sha256"] and path.stat().st_size == seg["size"]
        array, spacing = read_nifti(path)
        assert spacing == pytest.approx(CONFIG.grid.spacing)
        volume = float(array.sum()) * CONFIG.grid.voxel_volume_ml
        assert volume == pytest.approx(e["body"]["measures"]["tumor_volume"]["value"], abs=1e-3)


def test_noisy_labs_scatter_around_the_truth_as_specified(cohort):
    patients, _ = cohort
    logs = []
    for p in patients:
        for o in p.observations:
            if o.kind == "lab":
                truth = float(np.interp(o.t, p.truth_times.numpy(), p.truth_marker.numpy()))
                logs.append(math.log(o.value / truth))
    logs = np.array(logs)
    # log-normal noise with sd 0.10: the sample sd of ~20 draws lies well within [0.04, 0.2]
    assert abs(logs.mean()) < 0.1 and 0.04 < logs.std() < 0.2


def test_truth_file_matches_patients(cohort):
    patients, written = cohort
    truth = json.loads(written.truth_path.read_text())
    assert [t["pseudonym"] for t in truth["patients"]] == [p.pseudonym for p in patients]
    assert truth["patients"][0]["params"]["D"] == pytest.approx(patients[0].params["D"])
    # pseudonyms only: nothing that looks like a name or a medical record number
    assert all(t["pseudonym"].startswith("VP-") for t in truth["patients"])
