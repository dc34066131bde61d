"""faust's worker consumer takes our fetch wait instead of its hard-coded 1500 ms (the
end-to-end latency it buys is in bench.stream)."""

from __future__ import annotations

import asyncio

import pytest

from stream.faust_fetch import set_faust_fetch_wait


def test_the_worker_consumer_gets_our_fetch_wait() -> None:
    faust = pytest.importorskip("faust")
    from faust.transport.drivers import aiokafka as driver

    async def created_wait() -> int:
        app = faust.App("t-fetch-wait", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False, autodiscover=False)
        thread = driver.AIOKafkaConsumerThread(app.consumer, loop=asyncio.get_running_loop())
        consumer = thread._create_worker_consumer(app.transport)
        return int(consumer._fetch_max_wait_ms)

    set_faust_fetch_wait(77)
    assert asyncio.run(created_wait()) == 77
    set_faust_fetch_wait(50)  # applied once, the latest value wins
    assert asyncio.run(created_wait()) == 50
