"""Live logs: chunks published to a real NATS LOGS stream while the job runs, then an end marker."""

from __future__ import annotations

import uuid

import pytest
from gpuplane.v1 import messaging_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from daemon.executor import JobExecutor
from daemon.runtime import DockerRuntime
from daemon.settings import DaemonSettings
from messaging.subjects import (
    LOG_END_HEADER,
    LOG_STREAM_HEADER,
    LOGS_STREAM,
    logs_subject,
)
from storage.objects import ObjectStore
from tests.daemon.conftest import Reports, make_dispatch

pytestmark = pytest.mark.timeout(30)


async def test_log_chunks_and_end_marker_reach_the_logs_stream(
    jetstream: JetStreamContext,
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
) -> None:
    published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish_log(subject: str, data: bytes, headers: dict[str, str]) -> None:
        published.append((subject, data, headers))
        await jetstream.publish(subject, data, headers=headers)

    # 150 000 bytes on stdout: more than two 64 KiB chunks.
    script = "i=0; while [ $i -lt 1500 ]; do printf '%099d\\n' $i; i=$((i+1)); done; echo err >&2"
    dispatch = make_dispatch(test_image, args=["sh", "-c", script])
    dispatch.bucket = store.bucket
    cleanup_containers.append(dispatch.job_id)
    job = JobExecutor(
        dispatch,
        host_id="host-test",
        runtime=runtime,
        store=store,
        settings=settings,
        report=Reports(),
        publish_log=publish_log,
    )
    final = await job.run()
    assert final.exit_code == 0

    subject = logs_subject("host-test", dispatch.job_id, dispatch.attempt)
    sub = await jetstream.pull_subscribe(
        subject, durable=f"test-{uuid.uuid4().hex[:8]}", stream=LOGS_STREAM
    )
    messages: list[Msg] = []
    while len(messages) < len(published):
        messages += await sub.fetch(len(published) - len(messages), timeout=5)
    assert len(messages) == len(published)
    streams: dict[str, bytes] = {"stdout": b"", "stderr": b""}
    for message in messages[:-1]:
        assert message.subject == subject
        assert message.headers is not None
        name = message.headers[LOG_STREAM_HEADER]
        assert len(message.data) <= 64 * 1024
        streams[name] += message.data
    expected = b"".join(b"%099d\n" % i for i in range(1500))
    assert streams["stdout"] == expected
    assert streams["stderr"] == b"err\n"
    assert (
        sum(1 for m in messages if m.headers and m.headers.get(LOG_STREAM_HEADER) == "stdout") >= 3
    )
    end = messages[-1]
    assert end.headers is not None
    assert end.headers.get(LOG_END_HEADER) == "1"
    assert end.data == b""
    stdout_object = next(o for o in final.manifest if o.path == "logs/stdout")
    assert await store.get_bytes(stdout_object.key) == expected


async def test_logs_are_published_while_the_job_runs(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
) -> None:
    events: list[str] = []

    async def publish_log(subject: str, data: bytes, headers: dict[str, str]) -> None:
        events.append(f"log:{data.decode().strip()}" if data else "log-end")

    class Recorder(Reports):
        async def __call__(self, report: messaging_pb2.JobReport) -> None:
            events.append(messaging_pb2.JobReportKind.Name(report.kind))
            await super().__call__(report)

    dispatch = make_dispatch(test_image, args=["sh", "-c", "echo early; sleep 1; echo late"])
    dispatch.bucket = store.bucket
    cleanup_containers.append(dispatch.job_id)
    job = JobExecutor(
        dispatch,
        host_id="host-test",
        runtime=runtime,
        store=store,
        settings=settings,
        report=Recorder(),
        publish_log=publish_log,
    )
    await job.run()
    events = [e for e in events if e != "JOB_REPORT_KIND_USAGE"]
    assert events.index("JOB_REPORT_KIND_RUNNING") < events.index("log:early")
    assert events.index("log:early") < events.index("log:late")
    assert events.index("log:late") < events.index("log-end")
    assert events.index("log-end") < events.index("JOB_REPORT_KIND_UPLOADING")
