"""The forecast subscriber reads real records from the forecasts topic."""

from __future__ import annotations

import json
import threading

import pytest

from schemas import example
from stream import EventProducer, ensure_topics
from stream.subscriber import follow_forecasts, format_forecast

pytestmark = pytest.mark.integration


def test_follow_filters_by_patient_and_survives_junk(settings, topics):
    ensure_topics(settings, topics, partitions=2)
    base = example("forecast")
    with EventProducer(settings) as producer:
        for pid in ("VP-0001", "VP-0002", "VP-0001"):
            producer.send(topics.forecasts, pid, json.dumps({**base, "patient_id": pid}).encode())
        producer.send(topics.forecasts, "VP-0001", b"\xff not json")
    bad = []
    got = list(follow_forecasts(settings, topics, patient="VP-0001", idle_timeout=3.0,
                                on_bad=lambda raw, why: bad.append(why)))
    assert [r["patient_id"] for r in got] == ["VP-0001", "VP-0001"]
    assert len(bad) == 1 and "not JSON" in bad[0]
    line = format_forecast(got[0], "burden")
    first = got[0]["horizons"][0]
    q = first["quantities"]["burden"]
    assert line.startswith("VP-0001 @")
    assert f"+{first['days']:g}d {q['median']:.3g} [{q['lo']:.3g}, {q['hi']:.3g}]" in line


def test_follow_stops_when_asked(settings, topics):
    ensure_topics(settings, topics, partitions=1)
    stop = threading.Event()
    stop.set()
    assert list(follow_forecasts(settings, topics, stop=stop)) == []
