"""An EVENTS stream and consumer of the host-less release are updated in place: nothing
stored is lost, and reports on gpuplane.events.<host>.<job> reach the consumer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from controlplane.jobs.consumer import ReportConsumer
from devstack import NatsServer
from messaging.subjects import EVENTS_DURABLE, EVENTS_STREAM, ensure_streams, events_subject
from tests.serving import serve

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    yield from serve(NatsServer(tmp_path / "nats"))


async def test_old_events_stream_and_consumer_are_updated_in_place(fresh_nats: NatsServer) -> None:
    client = await nats.connect(fresh_nats.url)
    try:
        js = client.jetstream()
        old = StreamConfig(
            name=EVENTS_STREAM,
            subjects=["gpuplane.events.*"],
            retention=RetentionPolicy.WORK_QUEUE,
        )
        await js.add_stream(old)
        await js.pull_subscribe(
            "gpuplane.events.*",
            durable=EVENTS_DURABLE,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
        )
        await js.publish("gpuplane.events.job-before", b"in flight at the upgrade")

        await ensure_streams(js)
        consumer = ReportConsumer(js, cast(Any, None))
        await consumer.subscribe()
        info = await js.consumer_info(EVENTS_STREAM, EVENTS_DURABLE)
        assert info.config.filter_subject == "gpuplane.events.>"
        await js.publish(events_subject("host-1", "job-after"), b"after")
        assert consumer._sub is not None
        messages = await consumer._sub.fetch(2, timeout=5)
        assert [(m.subject, m.data) for m in messages] == [
            ("gpuplane.events.job-before", b"in flight at the upgrade"),
            ("gpuplane.events.host-1.job-after", b"after"),
        ]
    finally:
        await client.close()
