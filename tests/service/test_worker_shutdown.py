"""SIGTERM ends the worker process within 10 s whatever the brokers do (issue 14): against a
frozen broker (SIGSTOP) the batch in flight is abandoned uncommitted and the deadline of
stream.shutdown ends the process; with a healthy broker the worker finishes and commits its
batch and exits 0 on its own; and the deadline starts even while the main thread is blocked
in librdkafka, where Python signal handlers cannot run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from service_support import REPO, Cohort, committed, end_offsets, publish, start_worker_process, wait_for

from assimilation.store import StateStore
from stream import EmbeddedBroker, KafkaSettings, Topics, ensure_topics, read_all
from stream.shutdown import EXIT_SHUTDOWN_TIMEOUT, SHUTDOWN_S
from stream.worker import MAPS_PREFIX

EXPIRED = "did not stop within"  # stream.shutdown's log line when the deadline ends a process


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _held(state_dir: Path, cohort: Cohort) -> set[str]:
    """The event ids the worker made durable: applied to a twin or pending for a first study."""
    store = StateStore(state_dir.resolve().as_uri())
    out: set[str] = set()
    for pid in cohort.patients:
        twin = store.latest(pid)
        out |= set(twin.applied if twin is not None else ()) | {o.event_id for o in store.pending(pid)}
    return out


def _below(settings: KafkaSettings, topics: Topics, done: dict[int, int]) -> set[str]:
    """The event ids of the observation records below the committed offsets ``done``."""
    return {r.headers["event-id"] for r in read_all(settings, topics.observations, timeout=20, idle_timeout=1.0)
            if r.offset < done.get(r.partition, 0)}


def _stored_since(folder: Path, since: float) -> bool:
    """Whether a file under ``folder`` was written after ``since`` (seconds since the epoch)."""
    return folder.is_dir() and any(p.stat().st_mtime > since for p in folder.rglob("*") if p.is_file())


def _sigterm(process: subprocess.Popen, timeout: float = 30.0) -> tuple[float, int]:
    """SIGTERM; (seconds until the process was gone, its exit status)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        pytest.fail(f"SIGTERM did not end the worker within {timeout:g} s")
    return time.monotonic() - started, code


def _commits(settings: KafkaSettings, topics: Topics, process: subprocess.Popen, log: Path, records: int = 1) -> None:
    """Wait until the worker committed at least ``records`` records."""
    def done() -> bool:
        assert process.poll() is None, f"the worker exited early:\n{_log(log)}"
        return sum(committed(settings, topics.observations, settings.consumer_group).values()) >= records

    wait_for(done, 90, 0.1, what=f"the worker to commit {records} record(s)\n{_log(log)}")


@pytest.mark.integration
def test_sigterm_ends_the_worker_within_10_s_against_a_frozen_broker_leaving_its_batch_uncommitted(
    tmp_path: Path, cohort: Cohort
):
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        assert broker.pid is not None
        prefix = f"frozen-{uuid.uuid4().hex[:8]}"
        settings = replace(KafkaSettings.from_env({}).with_bootstrap(broker.bootstrap_servers), topic_prefix=prefix,
                           consumer_group=f"{prefix}-workers", topic_partitions=3)
        topics = Topics.from_settings(settings)
        ensure_topics(settings, topics)
        publish(settings, topics, cohort.records)  # each record gives one forecast to publish
        state_dir, log = tmp_path / "state", tmp_path / "worker.log"
        state_dir.mkdir()
        process = start_worker_process(settings, state_dir, cohort.root, log, max_batch=1)
        try:
            _commits(settings, topics, process, log, 10)  # past the first, slower, batches
            # Frozen, the broker still holds the worker's connections, and librdkafka has
            # records fetched ahead. A batch whose probability map is stored after the freeze
            # was persisted and is being published: its forecast can never be acknowledged. A
            # freeze that catches the worker publishing or committing an earlier batch holds it
            # there: let that through and freeze again (each freeze shorter than the session
            # timeout, so the group stays as it is).
            for _ in range(8):
                os.kill(broker.pid, signal.SIGSTOP)
                frozen_at = time.time()
                try:
                    wait_for(lambda: _stored_since(state_dir / MAPS_PREFIX, frozen_at), 2.5, 0.05,
                             what="a batch published after the freeze")
                    break
                except AssertionError:
                    os.kill(broker.pid, signal.SIGCONT)
                    time.sleep(0.5)
            else:
                pytest.fail(f"no batch was published after eight freezes (finished?)\n{_log(log)}")
            took, code = _sigterm(process)
        finally:
            os.kill(broker.pid, signal.SIGCONT)
            if process.poll() is None:
                process.kill()
                process.wait(10)

        assert took < 10, (took, _log(log))
        # Ended by the deadline (librdkafka's close waits on the frozen broker for seconds, and
        # a commit on its way for good) or, should the closes give up in time, on its own.
        assert (code, EXPIRED in _log(log)) in ((EXIT_SHUTDOWN_TIMEOUT, True), (0, False)), (code, _log(log))
        done = committed(settings, topics.observations, settings.consumer_group)
        held, below = _held(state_dir, cohort), _below(settings, topics, done)
        # Nothing committed was left undone, and the batch in flight (one record: max_batch),
        # persisted but not published, is the one thing done and left uncommitted.
        assert below <= held, sorted(below - held)
        assert len(held - below) == 1, (sorted(held - below), done)
        assert sum(done.values()) < sum(end_offsets(settings, topics.observations).values())


@pytest.mark.integration
def test_sigterm_with_a_healthy_broker_commits_the_batch_and_exits_0_on_its_own(
    settings, topics, state_dir, tmp_path: Path, cohort: Cohort
):
    publish(settings, topics, cohort.records)
    log = tmp_path / "worker.log"
    process = start_worker_process(settings, state_dir, cohort.root, log, max_batch=1)
    try:
        _commits(settings, topics, process, log)
        took, code = _sigterm(process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    # Before the deadline and by its own means: finished, committed, left the group.
    assert code == 0 and took < SHUTDOWN_S, (took, code, _log(log))
    assert "leaving the group" in _log(log) and EXPIRED not in _log(log)
    done = committed(settings, topics.observations, settings.consumer_group)
    total = sum(end_offsets(settings, topics.observations).values())
    assert 0 < sum(done.values()) < total, "the worker finished before the signal"
    # The batch in flight at the signal was finished and committed, not abandoned.
    assert _held(state_dir, cohort) == _below(settings, topics, done)


# The main thread blocked in a synchronous commit to a "broker" that accepts connections and
# never answers (the listen backlog completes them): librdkafka waits for good, and Python
# signal handlers never run. The child prints "returned" should the commit ever return.
_BLOCKED_IN_LIBRDKAFKA = textwrap.dedent("""
    import socket, sys, threading
    from confluent_kafka import Consumer, TopicPartition
    from stream.worker import install_signal_handlers

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    consumer = Consumer({"bootstrap.servers": "127.0.0.1:%d" % silent.getsockname()[1], "group.id": "g",
                         "log_level": 0})
    install_signal_handlers(threading.Event(), float(sys.argv[1]))
    print("ready", flush=True)
    consumer.commit(offsets=[TopicPartition("t", 0, 1)], asynchronous=False)
    print("returned", flush=True)
""")


def test_the_deadline_runs_while_the_main_thread_waits_in_librdkafka():
    deadline_s = 1.0
    process = subprocess.Popen([sys.executable, "-c", _BLOCKED_IN_LIBRDKAFKA, str(deadline_s)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert process.stdout is not None and process.stdout.readline() == "ready\n", process.stderr.read()
        time.sleep(0.5)  # into the commit
        took, code = _sigterm(process, timeout=deadline_s + 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    out, err = process.communicate()
    assert code == EXIT_SHUTDOWN_TIMEOUT and EXPIRED in err, (code, err[-2000:])
    assert "returned" not in out and deadline_s <= took < deadline_s + 5, took


