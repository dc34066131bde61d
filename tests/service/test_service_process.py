"""The worker as a process (``python -m stream.worker``): killed mid-stream it resumes to the
same twins and forecasts as an uninterrupted run; on SIGTERM it commits what it did, leaves the
group and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from service_support import (
    ENGINE,
    Cohort,
    Reference,
    committed,
    end_offsets,
    final_forecasts,
    forecasts,
    publish,
    start_worker_process,
    wait_for,
)

from assimilation.engine import Engine
from assimilation.store import StateStore
from schemas import validate_forecast
from stream import KafkaSettings, Topics, read_all
from stream.worker import Worker

pytestmark = pytest.mark.integration


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        raise


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _first_commit(settings: KafkaSettings, topics: Topics, process: subprocess.Popen, log: Path) -> dict[int, int]:
    seen: dict[int, int] = {}

    def done() -> bool:
        assert process.poll() is None, f"the worker exited early:\n{_log(log)}"
        seen.clear()
        seen.update(committed(settings, topics.observations, settings.consumer_group))
        return any(v > 0 for v in seen.values())

    wait_for(done, 90, 0.05, what=f"the worker's first commit\n{_log(log)}")
    return dict(seen)


def test_a_killed_worker_resumes_to_the_uninterrupted_result(settings, topics, state_dir, tmp_path, cohort: Cohort,
                                                             reference_state: Reference):
    publish(settings, topics, cohort.records)
    ends = end_offsets(settings, topics.observations)
    log = tmp_path / "worker.log"
    process = start_worker_process(settings, state_dir, cohort.root, log, max_batch=4)
    try:
        at_kill = _first_commit(settings, topics, process, log)
        process.kill()  # SIGKILL: no cleanup, no commit, whatever it was doing
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    after_kill = committed(settings, topics.observations, settings.consumer_group)
    assert 0 < sum(at_kill.values()) <= sum(after_kill.values()) < sum(ends.values()), \
        "the worker finished before it could be killed"

    process = start_worker_process(settings, state_dir, cohort.root, log, max_batch=4)
    try:
        wait_for(lambda: committed(settings, topics.observations, settings.consumer_group) == ends, 120, 0.5,
                 what=f"the restarted worker to commit everything\n{_log(log)}")
    finally:
        assert _stop(process) == 0, _log(log)

    store = StateStore(state_dir.resolve().as_uri())
    published = forecasts(settings, topics)
    assert all(validate_forecast(json.loads(r.value)) == [] for r in published)
    final = final_forecasts(published)
    for pid in cohort.patients:
        twin, expected = store.latest(pid), reference_state.twins[pid]
        assert len(twin.applied) == len(set(twin.applied)) and set(twin.applied) == cohort.event_ids(pid)
        assert twin.clock == expected.clock and twin.treatments == expected.treatments
        assert torch.allclose(twin.u, expected.u, rtol=0.0, atol=1e-6)
        assert torch.allclose(twin.log_params, expected.log_params, rtol=0.0, atol=1e-6)
        assert final[pid] == reference_state.forecasts[pid]


def test_sigterm_commits_what_was_done_and_a_successor_resumes_there(settings, topics, state_dir, tmp_path,
                                                                      cohort: Cohort, reference):
    publish(settings, topics, cohort.records)
    ends = end_offsets(settings, topics.observations)
    log = tmp_path / "worker.log"
    process = start_worker_process(settings, state_dir, cohort.root, log, max_batch=4)
    try:
        _first_commit(settings, topics, process, log)
        started = time.monotonic()
        assert _stop(process, signal.SIGTERM, timeout=20) == 0, _log(log)
        assert time.monotonic() - started < 15
    finally:
        if process.poll() is None:
            process.kill()
    assert "leaving the group" in _log(log)
    done = committed(settings, topics.observations, settings.consumer_group)
    total, processed = sum(ends.values()), sum(done.values())
    assert 0 < processed < total, (done, ends)

    # What the worker did is exactly what it committed: the twins hold the events below the
    # committed offsets (or wait for a first study), none beyond.
    store = StateStore(state_dir.resolve().as_uri())
    below = {r.headers["event-id"]
             for r in read_all(settings, topics.observations, timeout=20, idle_timeout=1.0)
             if r.offset < done.get(r.partition, 0)}
    held = set()
    for pid in cohort.patients:
        twin = store.latest(pid)
        held |= set(twin.applied if twin is not None else ()) | {o.event_id for o in store.pending(pid)}
    assert held == below

    # A successor in the group starts at the committed offsets: nothing lost, nothing repeated.
    successor = Worker(settings, Engine(StateStore(state_dir.resolve().as_uri()), ENGINE), topics, cohort.root,
                       max_batch=16, poll_timeout=0.2)
    with successor:
        successor.run_until_idle(idle_s=1.5, timeout=120)
    assert successor.summary.records == total - processed
    assert successor.summary.skipped == 0
    final = final_forecasts(forecasts(settings, topics))
    for pid in cohort.patients:
        twin = store.latest(pid)
        assert len(twin.applied) == len(set(twin.applied)) and set(twin.applied) == cohort.event_ids(pid)
        assert final[pid] == reference[pid]
