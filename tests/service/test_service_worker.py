"""The worker in-process on a real broker: forecasts that reflect the events, effectively-once
application under redelivery, late events, bad records, two workers in a group, determinism
and the metrics endpoint."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from service_support import (
    ENGINE,
    Cohort,
    canonical,
    committed,
    end_offsets,
    final_forecasts,
    forecasts,
    publish,
    wait_for,
)

from assimilation.engine import Engine
from assimilation.store import StateStore
from schemas import validate_forecast
from stream import KafkaSettings, Topics, ensure_topics, read_all
from stream.deadletter import original_bytes
from stream.volumes import read_nifti, sha256_file
from stream.worker import Worker

pytestmark = pytest.mark.integration


def make_worker(settings: KafkaSettings, topics: Topics, state_dir: Path, root: Path, **options) -> Worker:
    engine = Engine(StateStore(state_dir.resolve().as_uri()), ENGINE)
    options.setdefault("max_batch", 16)
    options.setdefault("poll_timeout", 0.2)
    return Worker(settings, engine, topics, root, **options)


def run_log(settings: KafkaSettings, topics: Topics, state_dir: Path, root: Path, **options) -> Worker:
    worker = make_worker(settings, topics, state_dir, root, **options)
    with worker:
        worker.run_until_idle(idle_s=1.5, timeout=120)
    return worker


def applied_ids(state_dir: Path, patient_id: str) -> tuple[str, ...]:
    twin = StateStore(state_dir.resolve().as_uri()).latest(patient_id)
    assert twin is not None, f"no twin for {patient_id}"
    return twin.applied


def test_forecasts_reflect_the_events_one_per_updated_patient_per_batch(
    settings, topics, state_dir, cohort: Cohort, reference
):
    publish(settings, topics, cohort.records)
    worker = run_log(settings, topics, state_dir, cohort.root)
    assert worker.summary.records == len(cohort.records) and worker.summary.dead_letters == 0

    published = forecasts(settings, topics)
    assert published, "no forecast published"
    docs = [json.loads(r.value) for r in published]
    for record, doc in zip(published, docs):
        assert validate_forecast(doc) == []
        assert record.key == doc["patient_id"]
        assert record.headers["content-type"] == "application/json" and record.headers["schema-version"] == "1.0"
    # One forecast per updated patient per batch, none for an unchanged one: every forecast is
    # of a new state (its id hashes the applied events), and no batch gave a patient two.
    assert len({d["forecast_id"] for d in docs}) == len(docs)
    assert worker.summary.forecasts == len(docs) <= worker.summary.batches * len(cohort.patients)
    # The final forecast is the one of all the events, equal to the engine's own in-order run.
    final = final_forecasts(published)
    assert set(final) == set(cohort.patients)
    for pid in cohort.patients:
        assert set(final[pid]["based_on_events"]) == cohort.event_ids(pid)
        assert final[pid] == reference[pid]
        assert sorted(applied_ids(state_dir, pid)) == sorted(cohort.event_ids(pid))
    assert read_all(settings, topics.deadletter, timeout=5, idle_timeout=0.5) == []
    # every forecast's probability maps resolve under the state store and verify by hash
    for doc in docs:
        claim = doc["probability_map_uri"]
        path = Path(state_dir) / claim["uri"]
        assert path.stat().st_size == claim["size"] and sha256_file(path) == claim["sha256"]
        maps, spacing = read_nifti(path)
        assert maps.shape == (16, 16, 16, len(doc["horizons"])) and spacing == pytest.approx((5.0, 5.0, 5.0))
        assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0


def test_redelivered_records_are_applied_once(settings, topics, state_dir, cohort: Cohort, reference):
    # Everything twice: the second copy arrives after the first was processed and committed,
    # and again interleaved within one batch.
    publish(settings, topics, cohort.records)
    first = run_log(settings, topics, state_dir, cohort.root)
    n_forecasts = first.summary.forecasts
    publish(settings, topics, [r for r in cohort.records for _ in range(2)])
    second = run_log(settings, topics, state_dir, cohort.root)

    assert second.summary.records == 2 * len(cohort.records)
    assert second.summary.applied == 0 and second.summary.skipped == 2 * len(cohort.records)
    assert second.summary.forecasts == 0, "a forecast for an unchanged patient was republished"
    published = forecasts(settings, topics)
    assert len(published) == n_forecasts
    for pid in cohort.patients:
        applied = applied_ids(state_dir, pid)
        assert len(applied) == len(set(applied)) and set(applied) == cohort.event_ids(pid)
        assert final_forecasts(published)[pid] == reference[pid]


def test_a_late_event_gives_the_in_order_forecast(settings, topics, state_dir, cohort: Cohort, reference):
    # An early lab result of the first patient arrives after everything else of the log.
    pid = cohort.patients[0]
    late = [r for r in cohort.of(pid) if r.kind == "lab"][1]
    publish(settings, topics, [r for r in cohort.records if r is not late])
    run_log(settings, topics, state_dir, cohort.root)
    before = final_forecasts(forecasts(settings, topics))
    assert late.event_id not in before[pid]["based_on_events"]

    publish(settings, topics, [late])
    worker = run_log(settings, topics, state_dir, cohort.root)
    assert worker.summary.applied == 1 and worker.summary.analyses > 1  # re-analysed, not appended
    final = final_forecasts(forecasts(settings, topics))
    assert final[pid] == reference[pid]
    assert final[cohort.patients[1]] == reference[cohort.patients[1]]


def _tampered(cohort: Cohort) -> bytes:
    """A valid-looking imaging observation whose density map does not hash as claimed."""
    record = next(r for r in cohort.records if r.kind == "imaging")
    doc = json.loads(record.value)
    text = json.dumps(doc).replace(record.event_id, str(uuid.uuid4()))
    doc = json.loads(text)
    for node in doc["@graph"]:
        if "ot:densityMap" in node:
            node["ot:densityMap"]["ot:sha256"] = "0" * 64
    return json.dumps(doc).encode()


def test_bad_records_are_dead_lettered_and_the_worker_keeps_going(settings, topics, state_dir, cohort: Cohort,
                                                                  reference):
    pid = cohort.patients[0]
    records = cohort.of(pid)
    garbage = b"\x00\xffnot json-ld at all"
    publish(settings, topics, records[:5])
    from service_support import ObservationRecord  # noqa: PLC0415

    bad = [
        ObservationRecord("-", pid, "imaging", garbage, {}, records[5].timestamp_ms),
        ObservationRecord("-", pid, "imaging", _tampered(cohort), {}, records[5].timestamp_ms),
    ]
    publish(settings, topics, bad)
    publish(settings, topics, records[5:])
    worker = run_log(settings, topics, state_dir, cohort.root)

    assert worker.summary.dead_letters == 2
    dead = [json.loads(r.value) for r in read_all(settings, topics.deadletter, timeout=10, idle_timeout=0.5)]
    assert sorted(d["stage"] for d in dead) == ["claim-check", "decode"]
    for d in dead:
        assert d["source"]["topic"] == topics.observations and d["source"]["offset"] >= 0
        assert d["reason"]
    assert {original_bytes(d) for d in dead} == {garbage, bad[1].value}
    # Everything after the bad records was processed as if they had not been there.
    final = final_forecasts(forecasts(settings, topics))
    assert final[pid] == reference[pid]
    assert sorted(applied_ids(state_dir, pid)) == sorted(cohort.event_ids(pid))


def test_replaying_a_log_into_fresh_state_gives_identical_forecasts(settings, tmp_path, cohort: Cohort):
    runs, finals = [], []
    for k in range(2):
        run_settings = replace(settings, topic_prefix=f"{settings.topic_prefix}-{k}",
                               consumer_group=f"{settings.consumer_group}-{k}")
        run_topics = Topics.from_settings(run_settings)
        ensure_topics(run_settings, run_topics)
        publish(run_settings, run_topics, cohort.records)
        # Other micro-batches in each run: the twins, and so the forecasts, do not depend on them.
        run_log(run_settings, run_topics, tmp_path / f"state-{k}", cohort.root, max_batch=8 + 9 * k)
        published = forecasts(run_settings, run_topics)
        runs.append({json.loads(r.value)["forecast_id"]: canonical(json.loads(r.value)) for r in published})
        finals.append({pid: canonical(doc) for pid, doc in final_forecasts(published).items()})
    common = set(runs[0]) & set(runs[1])
    assert common, "the two replays share no forecast"
    for forecast_id in common:
        assert runs[0][forecast_id] == runs[1][forecast_id]
    assert finals[0] == finals[1] and set(finals[0]) == set(cohort.patients)


def test_two_workers_share_the_partitions_and_apply_every_event_once(settings, topics, state_dir, cohort: Cohort,
                                                                     reference):
    # Two patients on partitions 0 and 2 of three: the range assignor gives each worker one.
    partition_of = {pid: 2 * k for k, pid in enumerate(cohort.patients)}
    workers = [make_worker(settings, topics, state_dir, cohort.root, max_batch=8) for _ in range(2)]
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(w.assignment() for w in workers)
                 and len(workers[0].assignment() | workers[1].assignment()) == 3, 60, what="both workers assigned")
        owners = [{p for _, p in w.assignment()} for w in workers]
        assert not owners[0] & owners[1]
        publish(settings, topics, cohort.records, partition_of)
        ends = end_offsets(settings, topics.observations)
        wait_for(lambda: committed(settings, topics.observations, settings.consumer_group) == ends, 120, 0.5,
                 what="all offsets committed")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert all(w.summary.records > 0 for w in workers), [w.summary for w in workers]
    assert sum(w.summary.records for w in workers) == len(cohort.records)
    assert sum(w.summary.skipped for w in workers) == 0  # nothing seen twice
    final = final_forecasts(forecasts(settings, topics))
    for pid in cohort.patients:
        applied = applied_ids(state_dir, pid)
        assert len(applied) == len(set(applied)) and set(applied) == cohort.event_ids(pid)
        assert final[pid] == reference[pid]


def test_metrics_endpoint_serves_counters_and_health(settings, topics, state_dir, cohort: Cohort):
    pid = cohort.patients[0]
    publish(settings, topics, cohort.of(pid)[:20])
    from service_support import ObservationRecord  # noqa: PLC0415

    publish(settings, topics, [ObservationRecord("-", pid, "lab", b"{}", {}, cohort.records[0].timestamp_ms)])
    worker = make_worker(settings, topics, state_dir, cohort.root, metrics_port=0)
    base = f"http://127.0.0.1:{worker.metrics_port}"
    with worker:
        worker.run_until_idle(idle_s=1.0, timeout=60)
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            assert response.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=5) as response:
            text = response.read().decode()

    def value(name: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(name) and not ln.startswith("#")]
        assert lines, f"{name} missing"
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    assert value("oncotwin_worker_records_total") == 21
    assert value('oncotwin_worker_events_total{kind="treatment",outcome="applied"}') > 0
    assert value("oncotwin_worker_analyses_total") > 0
    assert value('oncotwin_worker_dead_letters_total{stage="decode"}') == 1
    assert value("oncotwin_worker_forecasts_published_total") == worker.summary.forecasts > 0
    assert value("oncotwin_worker_forecast_latency_fetch_seconds_count") > 0
    assert value("oncotwin_worker_forecast_latency_event_time_seconds_count") > 0
    assert "oncotwin_worker_consumer_lag{" in text and value("oncotwin_worker_consumer_lag") == 0
    # closed: the endpoint is gone
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(base + "/healthz", timeout=2)


def test_an_unacknowledged_flush_commits_nothing_and_the_batch_is_done_again(settings, topics, state_dir,
                                                                            cohort: Cohort, reference):
    from stream import DeliveryError, DeliveryFailure  # noqa: PLC0415

    pid = cohort.patients[0]
    publish(settings, topics, cohort.of(pid))
    worker = make_worker(settings, topics, state_dir, cohort.root, flush_attempts=2, retry_pause_s=0.1)
    failing = {"left": 2}
    real_flush = worker._producer.flush

    def flaky_flush(timeout: float = 30.0) -> None:
        # The brokers "do not acknowledge" the first batch's forecasts (twice: every attempt).
        real_flush(timeout)
        if failing["left"] > 0:
            failing["left"] -= 1
            raise DeliveryError([DeliveryFailure(topics.forecasts, pid, "simulated: not acknowledged")])

    worker._producer.flush = flaky_flush  # type: ignore[method-assign]
    seen_commits: list[dict] = []
    with worker:
        first = worker.step()
        while not first.records:
            first = worker.step()
        # The batch was processed (the twin persisted) but nothing was committed.
        seen_commits.append(committed(settings, topics.observations, settings.consumer_group))
        worker.run_until_idle(idle_s=1.5, timeout=120)
    assert first.committed == {} and seen_commits[0] == {}
    assert worker.summary.rewinds == 1 and worker.summary.recovered_forecasts >= 1
    final = final_forecasts(forecasts(settings, topics))
    assert final[pid] == reference[pid]
    applied = applied_ids(state_dir, pid)
    assert len(applied) == len(set(applied)) and set(applied) == cohort.event_ids(pid)


def test_a_twin_follows_its_patient_to_a_new_worker_through_an_s3_bucket(settings, topics, cohort: Cohort,
                                                                         reference, s3_endpoint):
    """DESIGN §6: worker A (state in a bucket) takes the first half of the log and goes away;
    worker B, a fresh process as far as state goes, resumes every twin from the bucket."""
    url = f"s3://oncotwin-test/{uuid.uuid4().hex[:8]}/state?endpoint={s3_endpoint}"

    def worker() -> Worker:
        return Worker(settings, Engine(StateStore(url), ENGINE), topics, cohort.root, max_batch=8, poll_timeout=0.2)

    half = len(cohort.records) // 2
    publish(settings, topics, cohort.records[:half])
    with worker() as a:
        a.run_until_idle(idle_s=1.5, timeout=120)
    publish(settings, topics, cohort.records[half:])
    with worker() as b:
        b.run_until_idle(idle_s=1.5, timeout=120)
    assert a.summary.records == half and b.summary.records == len(cohort.records) - half
    assert b.summary.skipped == 0
    assert final_forecasts(forecasts(settings, topics)) == reference
    store = StateStore(url)
    for pid in cohort.patients:
        applied = store.latest(pid).applied
        assert len(applied) == len(set(applied)) and set(applied) == cohort.event_ids(pid)
