"""The daemon's Connect stream: hello, heartbeats, commands; reconnects with backoff and jitter."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

RunningJobs = Callable[[], list[registry_pb2.RunningJob]]
OnCommand = Callable[[registry_pb2.ControlMessage], Awaitable[None]]
OnUnauthenticated = Callable[[], Awaitable[str | None]]
Call: TypeAlias = (
    "grpc.aio.StreamStreamCall[registry_pb2.DaemonMessage, registry_pb2.ControlMessage]"
)


class ControlSession:
    """Keeps one Connect stream open for as long as `run()` runs.

    Each (re)connect sends hello (host id, GPUs, running jobs), then a heartbeat every
    interval (the HelloAck's, else `heartbeat_interval_ms`). Commands go to `on_command`.
    A broken stream is retried after an exponential backoff with full jitter, reset once a
    HelloAck arrives; jobs keep running meanwhile. UNAUTHENTICATED asks `on_unauthenticated`
    for a new credential (re-registration), which may return None to keep waiting.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        host_id: str,
        credential: str,
        daemon_version: str,
        gpus: list[types_pb2.Gpu],
        running_jobs: RunningJobs,
        on_command: OnCommand,
        on_unauthenticated: OnUnauthenticated | None = None,
        heartbeat_interval_ms: int = 2000,
        backoff_max_seconds: float = 30.0,
    ) -> None:
        self.stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.host_id = host_id
        self.credential = credential
        self.daemon_version = daemon_version
        self.gpus = gpus
        self.running_jobs = running_jobs
        self.on_command = on_command
        self.on_unauthenticated = on_unauthenticated
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.backoff_max_seconds = backoff_max_seconds
        self.connected = asyncio.Event()
        self.sessions = 0

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._session()
                log.warning("control plane closed the Connect stream")
            except grpc.aio.AioRpcError as exc:
                log.warning("Connect stream broken: %s %s", exc.code().name, exc.details())
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.on_unauthenticated:
                    credential = await self.on_unauthenticated()
                    if credential:
                        self.credential = credential
            except Exception:  # noqa: BLE001 - whatever broke the stream, connect again
                log.exception("Connect stream failed")
            finally:
                if self.connected.is_set():
                    backoff = 0.5
                self.connected.clear()
            delay = random.uniform(0, backoff)
            backoff = min(backoff * 2, self.backoff_max_seconds)
            await asyncio.sleep(delay)

    def _hello(self) -> registry_pb2.DaemonMessage:
        return registry_pb2.DaemonMessage(
            hello=registry_pb2.DaemonHello(
                host_id=self.host_id,
                daemon_version=self.daemon_version,
                gpus=self.gpus,
                running_jobs=self.running_jobs(),
            )
        )

    async def _session(self) -> None:
        metadata = (("authorization", f"Bearer {self.credential}"),)
        call = self.stub.Connect(metadata=metadata)  # type: ignore[call-arg]
        tasks: list[asyncio.Task[None]] = []
        try:
            await call.write(self._hello())
            tasks = [
                asyncio.create_task(self._read(call)),
                asyncio.create_task(self._heartbeats(call)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended the session
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    async def _read(self, call: Call) -> None:
        async for message in call:
            if message.WhichOneof("msg") == "hello_ack":
                ack = message.hello_ack
                if ack.heartbeat_interval_ms:
                    self.heartbeat_interval_ms = ack.heartbeat_interval_ms
                self.sessions += 1
                self.connected.set()
                log.info("connected to the control plane as host %s", self.host_id)
            try:
                await self.on_command(message)
            except Exception:  # noqa: BLE001 - one bad command must not end the session
                log.exception("handling %s failed", message.WhichOneof("msg"))

    async def _heartbeats(self, call: Call) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_ms / 1000)
            now = Timestamp()
            now.GetCurrentTime()
            beat = registry_pb2.Heartbeat(time=now, running_jobs=self.running_jobs())
            await call.write(registry_pb2.DaemonMessage(heartbeat=beat))
