"""The state store: exact round trips, snapshot lookup, retention and atomic writes."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta

import pytest
import torch

from assimilation.observations import ImagingObservation, MarkerObservation, TreatmentEvent
from assimilation.store import (
    FileBackend,
    MemoryBackend,
    RetentionPolicy,
    StateStore,
    decode_observation,
    encode_observation,
    encode_twin,
)
from assimilation.filters.etkf import ETKF
from assimilation.twin import PatientTwin, TwinConfig, assimilate, compact, init_twin


@pytest.fixture(scope="module")
def twin(events) -> PatientTwin:
    first = next(o for o in events if isinstance(o, ImagingObservation))
    t = init_twin(first.patient_id, first, 8, filter_version="test-filter")
    # a few treatments and one analysis, so that every field of the twin is populated
    later = [o for o in events if o.time <= first.time + timedelta(days=30) and o.event_id != first.event_id]
    t, report = assimilate(t, later, ETKF())
    assert report.analyses and t.treatments
    return t


def _assert_same_twin(a: PatientTwin, b: PatientTwin) -> None:
    for name in ("u", "log_params", "tissue"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("patient_id", "epoch", "grid", "clock", "prior", "origin_event_id", "started_at",
                 "last_analysis", "treatments", "applied", "marker_code", "marker_unit", "model_version",
                 "filter_version", "n_analyses"):
        assert getattr(a, name) == getattr(b, name), name


def test_save_load_round_trip_is_exact(tmp_path, twin):
    store = StateStore(f"file://{tmp_path}")
    key = store.save(twin)
    assert key.endswith(".safetensors") and (tmp_path / key).is_file()
    _assert_same_twin(store.load(key), twin)
    _assert_same_twin(store.latest(twin.patient_id), twin)
    assert store.patients() == [twin.patient_id]
    assert store.latest("someone-else") is None


def test_observations_round_trip_through_the_journal(tmp_path, events, twin):
    store = StateStore(str(tmp_path))  # a plain path works as well as file://
    study = next(o for o in events if isinstance(o, ImagingObservation))
    later_study = [o for o in events if isinstance(o, ImagingObservation)][1]
    small = compact(later_study, twin, TwinConfig())
    lab = next(o for o in events if isinstance(o, MarkerObservation))
    rt = next(o for o in events if isinstance(o, TreatmentEvent))
    store.journal_put([study, small, lab, rt])
    store.journal_put([lab])  # idempotent: one object per event id
    back = {o.event_id: o for o in store.journal(twin.patient_id)}
    assert len(back) == 4
    assert back[lab.event_id] == lab and back[rt.event_id] == rt
    s = back[study.event_id]
    assert torch.equal(torch.as_tensor(s.density), torch.as_tensor(study.density))
    assert torch.equal(torch.as_tensor(s.tissue), torch.as_tensor(study.tissue)) and s.time == study.time
    c = back[small.event_id]
    assert torch.equal(c.index, small.index) and torch.equal(c.values, small.values)
    assert (c.channel, c.shape, c.spacing_mm, c.tumor_volume_ml) == (small.channel, small.shape, small.spacing_mm,
                                                                     small.tumor_volume_ml)
    # a compact study is a few hundred voxels, not the whole image
    assert len(encode_observation(small)) < len(encode_observation(study)) / 4
    assert decode_observation(encode_observation(lab)) == lab


def test_snapshot_before_returns_the_newest_strictly_earlier_one(twin):
    store = StateStore(MemoryBackend())
    for clock in (10.0, 20.0, 30.5):
        store.save(replace(twin, clock=clock, n_analyses=int(clock)))
    pid = twin.patient_id
    assert [c for c, _ in store.snapshots(pid)] == [10.0, 20.0, 30.5]
    assert store.snapshot_before(pid, 30.5).clock == 20.0
    assert store.snapshot_before(pid, 30.6).clock == 30.5
    assert store.snapshot_before(pid, 20.0001).clock == 20.0
    assert store.snapshot_before(pid, 10.0) is None
    assert store.latest(pid).n_analyses == 30
    # one snapshot per clock: saving at an existing clock replaces it
    store.save(replace(twin, clock=20.0, n_analyses=99))
    assert len(store.snapshots(pid)) == 3 and store.snapshot_before(pid, 25.0).n_analyses == 99


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (RetentionPolicy(keep_last=2, keep_days=None), [50.0, 60.0]),
        (RetentionPolicy(keep_last=None, keep_days=25.0), [40.0, 50.0, 60.0]),
        (RetentionPolicy(keep_last=1, keep_days=15.0), [50.0, 60.0]),  # union of both rules
        (RetentionPolicy(keep_last=None, keep_days=None), [10.0, 20.0, 40.0, 50.0, 60.0]),
    ],
)
def test_retention_deletes_exactly_what_the_policy_drops(twin, policy, kept):
    store = StateStore(MemoryBackend(), retention=policy)
    clocks = [10.0, 20.0, 40.0, 50.0, 60.0]
    for clock in clocks:
        store.save(replace(twin, clock=clock))
    dropped = store.apply_retention(twin.patient_id)
    assert [c for c, _ in store.snapshots(twin.patient_id)] == kept
    assert sorted(dropped) == sorted(store.snapshot_key(twin.patient_id, c) for c in clocks if c not in kept)


def test_a_write_is_atomic(tmp_path, twin, monkeypatch):
    backend = FileBackend(tmp_path)
    store = StateStore(backend)
    key = store.save(twin)
    before = (tmp_path / key).read_bytes()
    target = tmp_path / key
    seen = {}
    real_replace = os.replace

    def spying_replace(src, dst):
        # At the moment of the rename the complete new object sits in a hidden temporary file
        # beside the target, and the target still holds the old snapshot.
        seen["tmp"] = os.path.basename(src)
        seen["complete"] = open(src, "rb").read() == new_bytes
        seen["target_intact"] = target.read_bytes() == before
        seen["listed"] = backend.list("twins/")
        return real_replace(src, dst)

    moved = replace(twin, n_analyses=twin.n_analyses + 1)
    new_bytes = encode_twin(moved)
    monkeypatch.setattr(os, "replace", spying_replace)
    store.save(moved)
    assert seen["tmp"].startswith(".") and seen["tmp"].endswith(".tmp")
    assert seen["complete"] and seen["target_intact"]
    assert all(not k.rsplit("/", 1)[-1].startswith(".") for k in seen["listed"])
    assert store.latest(twin.patient_id).n_analyses == twin.n_analyses + 1

    # A writer that dies before the rename leaves the old snapshot and no stray file.
    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        store.save(replace(twin, n_analyses=1234))
    monkeypatch.setattr(os, "replace", real_replace)
    assert store.latest(twin.patient_id).n_analyses == twin.n_analyses + 1
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_pending_observations_wait_and_clear(twin):
    store = StateStore("memory://")
    lab = MarkerObservation(event_id="lab-1", patient_id="P-1", time=twin.epoch, code="2532-0", value=200.0, unit="U/L")
    store.pending_put([lab])
    assert store.pending("P-1") == [lab] and store.pending("P-2") == []
    store.pending_clear("P-1")
    assert store.pending("P-1") == []
