"""ConnectClient against a real gRPC server: bearer credential, hello, heartbeats, commands,
telemetry (sent while connected, dropped otherwise), and a new session (hello again) after
the control plane drops the stream; the reconnect backoff's jitter."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from daemon.connect import Backoff, ConnectClient

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
    session = ConnectClient(
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
        # The cancel came before the first heartbeat, but the daemon hands it to on_command
        # from its reader task, which a loaded machine may run after the heartbeat went out.
        for _ in range(200):
            if commands:
                break
            await asyncio.sleep(0.025)
        cancels = [c.cancel for c in commands if c.WhichOneof("msg") == "cancel"]
        assert [(c.job_id, c.attempt, c.reason) for c in cancels] == [("job-1", 2, "user")]
        assert session.streams_opened == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close(None)
        await server.stop(0)


class Recorder(registry_pb2_grpc.RegistryServiceServicer):
    """Acks each hello with a telemetry interval and records every message; `drop` ends the
    current stream, and new ones are refused until `accept` is set again."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[registry_pb2.DaemonMessage] = asyncio.Queue()
        self.drop = asyncio.Event()
        self.accept = asyncio.Event()
        self.accept.set()

    async def Connect(
        self, request_iterator: AsyncIterator[registry_pb2.DaemonMessage], context: Any
    ) -> AsyncIterator[registry_pb2.ControlMessage]:
        if not self.accept.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        first = await anext(aiter(request_iterator))
        await self.messages.put(first)
        yield registry_pb2.ControlMessage(
            hello_ack=registry_pb2.HelloAck(heartbeat_interval_ms=60_000, telemetry_interval_ms=250)
        )

        async def record() -> None:
            async for message in request_iterator:
                await self.messages.put(message)

        reader = asyncio.create_task(record())
        await self.drop.wait()
        self.drop.clear()
        self.accept.clear()
        reader.cancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")


async def next_of(queue: asyncio.Queue[registry_pb2.DaemonMessage], kind: str) -> Any:
    async with asyncio.timeout(5):
        while True:
            message = await queue.get()
            if message.WhichOneof("msg") == kind:
                return getattr(message, kind)


async def test_telemetry_goes_out_while_connected_and_is_dropped_otherwise() -> None:
    server = grpc.aio.server()
    recorder = Recorder()  # type: ignore[abstract]  # only Connect is served
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

    async def on_command(message: registry_pb2.ControlMessage) -> None:
        pass

    session = ConnectClient(
        channel,
        host_id="host-1",
        credential="hc",
        daemon_version="test",
        gpus=[],
        running_jobs=list,
        on_command=on_command,
        backoff_base_seconds=0.05,
    )
    batch = registry_pb2.TelemetryBatch(samples=[types_pb2.GpuTelemetry(gpu_uuid="GPU-1")])
    assert not session.send_telemetry(batch)  # no stream yet: dropped, not queued
    await server.start()
    task = asyncio.create_task(session.run())
    try:
        await asyncio.wait_for(session.connected.wait(), 5)
        assert session.telemetry_interval_ms == 250  # from the HelloAck
        assert session.send_telemetry(batch)
        sent = await next_of(recorder.messages, "telemetry")
        assert [s.gpu_uuid for s in sent.samples] == ["GPU-1"]

        recorder.drop.set()
        async with asyncio.timeout(5):
            while session.connected.is_set():
                await asyncio.sleep(0.01)
        dropped = session.telemetry_dropped
        assert not session.send_telemetry(batch)
        assert session.telemetry_dropped == dropped + 1
        recorder.accept.set()
        await asyncio.wait_for(session.connected.wait(), 5)  # reconnected: hello again
        assert session.streams_opened == 2
        assert session.send_telemetry(batch)
        await next_of(recorder.messages, "telemetry")
        # The server can read the batch before the session's write call returns to count it.
        async with asyncio.timeout(5):
            while session.telemetry_sent < 2:
                await asyncio.sleep(0.01)
        assert session.telemetry_sent == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close(None)
        await server.stop(0)


def test_backoff_spreads_a_fleet_and_doubles_its_window() -> None:
    rng = random.Random(7)
    backoff = Backoff(2.0, 30.0, rng)
    assert [backoff.window() for _ in range(1) for _ in [backoff.next_delay()]] == [4.0]
    backoff.reset()
    windows = []
    for _ in range(7):
        windows.append(backoff.window())
        assert 0 <= backoff.next_delay() <= windows[-1]
    assert windows == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    backoff.reset()
    assert backoff.window() == 2.0
    # A control plane restart breaks 1000 streams at once: their first reconnects spread
    # over the whole first window, no single second takes the fleet.
    fleet = [Backoff(2.0, 30.0).next_delay() for _ in range(1000)]
    assert max(fleet) <= 2.0
    per_second = [sum(1 for d in fleet if s <= d < s + 1) for s in (0, 1)]
    assert all(300 < n < 700 for n in per_second), per_second
