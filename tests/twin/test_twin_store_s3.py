"""The state store on a real S3-compatible server (SeaweedFS): the backend's contract, exact
twin round trips, and a twin that follows its patient to another worker through the bucket."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import torch

from assimilation.engine import Engine, EngineConfig
from assimilation.filters.etkf import ETKF
from assimilation.observations import ImagingObservation
from assimilation.s3 import S3Backend, S3Error
from assimilation.store import MemoryBackend, RetentionPolicy, StateStore, open_backend
from assimilation.twin import assimilate, init_twin


@pytest.fixture
def url(s3_endpoint: str) -> str:
    """A fresh prefix in a shared bucket: tests do not see each other's objects."""
    return f"s3://oncotwin-test/{uuid.uuid4().hex[:8]}/state?endpoint={s3_endpoint}"


def test_the_backend_keeps_the_store_contract(url: str, s3_endpoint: str) -> None:
    backend = open_backend(url)
    assert isinstance(backend, S3Backend) and backend.endpoint_url == s3_endpoint
    backend.put_bytes("twins/b/x", b"1")
    backend.put_bytes("twins/a/y", b"\x00" * 70_000)
    backend.put_bytes("twins/a/x", b"first")
    backend.put_bytes("twins/a/x", b"second")  # a PUT replaces the object whole
    assert backend.get_bytes("twins/a/x") == b"second"
    assert backend.get_bytes("twins/a/y") == b"\x00" * 70_000
    assert backend.list("twins/a/") == ["twins/a/x", "twins/a/y"]
    assert backend.list("twins/") == ["twins/a/x", "twins/a/y", "twins/b/x"]
    assert backend.list("nothing/") == []
    backend.delete("twins/a/x")
    backend.delete("twins/a/x")  # deleting what is gone is not an error
    with pytest.raises(KeyError):
        backend.get_bytes("twins/a/x")
    with pytest.raises(ValueError):
        backend.put_bytes("../escape", b"")
    # another prefix of the same bucket is another store
    other = open_backend(url.replace("/state?", "/other?"))
    assert other.list("") == []


def test_bad_urls_and_unreachable_servers_give_clear_errors(s3_endpoint: str) -> None:
    with pytest.raises(ValueError, match="bucket"):
        open_backend("s3:///no-bucket")
    with pytest.raises(ValueError, match="unknown option"):
        open_backend(f"s3://b/p?endpoint={s3_endpoint}&secret=x")
    with pytest.raises(S3Error, match="127.0.0.1:9"):
        S3Backend("b", endpoint_url="http://127.0.0.1:9")  # nothing listens on the discard port


def test_a_twin_round_trips_exactly_through_the_bucket(url: str, events) -> None:
    first = next(o for o in events if isinstance(o, ImagingObservation))
    twin = init_twin(first.patient_id, first, 8)
    later = [o for o in events if first.time < o.time <= first.time + timedelta(days=30)]
    twin, _ = assimilate(twin, later, ETKF())
    store = StateStore(url, retention=RetentionPolicy(keep_last=None, keep_days=None))
    key = store.save(twin)
    again = StateStore(url).load(key)  # another process would open the same URL
    for name in ("u", "log_params", "tissue"):
        assert torch.equal(getattr(again, name), getattr(twin, name)), name
    assert (again.clock, again.applied, again.treatments) == (twin.clock, twin.applied, twin.treatments)
    assert store.patients() == [twin.patient_id]
    assert [k for _, k in store.snapshots(twin.patient_id)] == [key]


def test_a_twin_follows_its_patient_to_another_worker(url: str, events, patient) -> None:
    """Worker A assimilates the first 100 days and stops (a rebalance); worker B, a new engine
    on the same bucket, takes the rest. Same result, to the bit, as one engine throughout."""
    config = EngineConfig(n_members=8)
    split = min(o.time for o in events) + timedelta(days=100)
    before = [o for o in events if o.time <= split]
    after = [o for o in events if o.time > split]
    assert before and after

    Engine(StateStore(url), config).process(before)
    moved = Engine(StateStore(url), config).process(after)

    alone = Engine(StateStore(MemoryBackend()), config)
    alone.process(before)
    expected = alone.process(after)
    assert len(moved) == len(expected) == 1
    for q in ("volume_ml", "burden_ml", "marker", "ctdna_fraction", "prob_visible"):
        assert torch.equal(getattr(moved[0], q), getattr(expected[0], q)), q
    assert set(moved[0].based_on_events) == set(expected[0].based_on_events)
    assert StateStore(url).latest(patient.pseudonym).applied == alone.store.latest(patient.pseudonym).applied
