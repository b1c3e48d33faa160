"""ControlSession against a real gRPC server: bearer credential, hello, heartbeats, commands,
and a new session (hello again) after the control plane drops the stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from daemon.session import ControlSession

pytestmark = pytest.mark.timeout(20)


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    """Drops the first Connect stream right after its HelloAck; keeps the second, sending a
    cancel command on it and recording its heartbeats."""

    def __init__(self) -> None:
        self.hellos: list[registry_pb2.DaemonHello] = []
        self.credentials: list[str] = []
        self.heartbeats: asyncio.Queue[registry_pb2.Heartbeat] = asyncio.Queue()

    async def Connect(
        self, request_iterator: AsyncIterator[registry_pb2.DaemonMessage], context: Any
    ) -> AsyncIterator[registry_pb2.ControlMessage]:
        metadata = dict(context.invocation_metadata())
        self.credentials.append(metadata.get("authorization", ""))
        first = await anext(aiter(request_iterator))
        self.hellos.append(first.hello)
        yield registry_pb2.ControlMessage(
            hello_ack=registry_pb2.HelloAck(host_id=first.hello.host_id, heartbeat_interval_ms=50)
        )
        if len(self.hellos) == 1:
            return
        yield registry_pb2.ControlMessage(
            cancel=registry_pb2.CancelCommand(job_id="job-1", attempt=2, reason="user")
        )
        async for message in request_iterator:
            if message.WhichOneof("msg") == "heartbeat":
                await self.heartbeats.put(message.heartbeat)


async def test_reconnects_with_hello_and_takes_commands() -> None:
    server = grpc.aio.server()
    registry = Registry()  # type: ignore[abstract]  # only Connect is served
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    commands: list[registry_pb2.ControlMessage] = []

    async def on_command(message: registry_pb2.ControlMessage) -> None:
        commands.append(message)

    running = [
        registry_pb2.RunningJob(job_id="job-1", attempt=2, state=types_pb2.JOB_STATE_RUNNING)
    ]
    session = ControlSession(
        channel,
        host_id="host-1",
        credential="hc_secret",
        daemon_version="test",
        gpus=[types_pb2.Gpu(uuid="GPU-1")],
        running_jobs=lambda: running,
        on_command=on_command,
        heartbeat_interval_ms=5000,
        backoff_max_seconds=0.5,
    )
    task = asyncio.create_task(session.run())
    try:
        beat = await asyncio.wait_for(registry.heartbeats.get(), timeout=10)
        assert len(registry.hellos) == 2
        assert registry.credentials == ["Bearer hc_secret", "Bearer hc_secret"]
        hello = registry.hellos[1]
        assert hello.host_id == "host-1"
        assert [g.uuid for g in hello.gpus] == ["GPU-1"]
        assert list(hello.running_jobs) == running
        assert list(beat.running_jobs) == running
        assert session.heartbeat_interval_ms == 50  # taken from the HelloAck
        cancels = [c.cancel for c in commands if c.WhichOneof("msg") == "cancel"]
        assert [(c.job_id, c.attempt, c.reason) for c in cancels] == [("job-1", 2, "user")]
        assert session.sessions == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close(None)
        await server.stop(0)
