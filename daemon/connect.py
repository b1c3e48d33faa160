"""The daemon's Connect stream: hello, heartbeats, telemetry, commands; reconnects with jitter."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeAlias

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

RunningJobs = Callable[[], list[registry_pb2.RunningJob]]
Answer: TypeAlias = "registry_pb2.CommandAnswer.ValueType"
# What on_command made of a command: an answer to acknowledge it with, or None to leave it
# unacknowledged (the control plane sends it again).
OnCommand: TypeAlias = "Callable[[registry_pb2.ControlMessage], Awaitable[Answer | None]]"
OnUnauthenticated = Callable[[], Awaitable[str | None]]
Call: TypeAlias = (
    "grpc.aio.StreamStreamCall[registry_pb2.DaemonMessage, registry_pb2.ControlMessage]"
)
# Answered command ids kept, so that a re-sent command is answered again, not acted on twice.
_REMEMBERED_COMMANDS = 4096


class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in
    [0, min(cap, base * 2**n)]. A control plane that restarts drops every stream at once;
    full jitter spreads the fleet's first reconnects over `base` seconds, the next ones
    over twice that, and so on, instead of bringing all daemons back in the same instant."""

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = max(cap, base)
        self.attempt = 0
        # Seeded from os.urandom per process, so daemons started together do not agree.
        self._rng = rng or random.Random()

    def window(self) -> float:
        return float(min(self.cap, self.base * 2**self.attempt))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, self.window())
        self.attempt = min(self.attempt + 1, 32)
        return delay

    def reset(self) -> None:
        self.attempt = 0


class ConnectClient:
    """Keeps one Connect stream open for as long as `run()` runs.

    Each (re)connect sends hello (host id, GPUs, running jobs), then a heartbeat every
    interval (the HelloAck's, else `heartbeat_interval_ms`) and each telemetry batch handed
    to `send_telemetry` while connected (one writer per stream, so writes never interleave).
    Commands go to `on_command`; one with a command_id is acknowledged with its answer
    (CommandAck, written by the stream's writer) and remembered, so that the same id sent
    again (the control plane re-sends until it hears the ack) is answered again without
    reaching `on_command`. A broken stream is retried after a Backoff delay, reset once
    a HelloAck arrives; jobs keep running and reporting (over NATS) meanwhile.
    UNAUTHENTICATED asks `on_unauthenticated` for a new credential (re-registration), which
    may return None to keep waiting.
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
        telemetry_interval_ms: int = 5000,
        backoff_base_seconds: float = 1.0,
        backoff_max_seconds: float = 30.0,
        driver_versions: tuple[str, str] = ("", ""),
    ) -> None:
        self.stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.host_id = host_id
        self.credential = credential
        self.daemon_version = daemon_version
        self.gpus = gpus
        # (driver, CUDA driver) versions, said in each hello.
        self.driver_versions = driver_versions
        self.running_jobs = running_jobs
        self.on_command = on_command
        self.on_unauthenticated = on_unauthenticated
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.telemetry_interval_ms = telemetry_interval_ms
        self.backoff = Backoff(backoff_base_seconds, backoff_max_seconds)
        self.connected = asyncio.Event()
        self.streams_opened = 0
        self.telemetry_sent = 0
        self.telemetry_dropped = 0
        # Commands answered again without acting (re-sent by the control plane).
        self.commands_repeated = 0
        self._answered: OrderedDict[int, Answer] = OrderedDict()
        self._acks: list[registry_pb2.CommandAck] = []
        # Other messages for the writer (probe answers), in order.
        self._outgoing: list[registry_pb2.DaemonMessage] = []
        self._pending: registry_pb2.TelemetryBatch | None = None
        self._wake = asyncio.Event()
        # When this stream's hello went out (monotonic): the HelloAck's known_jobs were
        # listed after it.
        self.hello_sent_at = 0.0

    def send_telemetry(self, batch: registry_pb2.TelemetryBatch) -> bool:
        """Queues `batch` for the stream's writer; False (dropped) while not connected. An
        unsent batch is replaced by a newer one: at most one waits."""
        if not self.connected.is_set():
            self.telemetry_dropped += 1
            return False
        if self._pending is not None:
            self.telemetry_dropped += 1
        self._pending = batch
        self._wake.set()
        return True

    async def run(self) -> None:
        while True:
            try:
                await self._stream()
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
                    self.backoff.reset()
                self.connected.clear()
                self._pending = None
                self._acks = []  # answers to a broken stream: the commands come again
            delay = self.backoff.next_delay()
            log.info("reconnecting to the control plane in %.1fs", delay)
            await asyncio.sleep(delay)

    def _hello(self) -> registry_pb2.DaemonMessage:
        return registry_pb2.DaemonMessage(
            hello=registry_pb2.DaemonHello(
                host_id=self.host_id,
                daemon_version=self.daemon_version,
                gpus=self.gpus,
                running_jobs=self.running_jobs(),
                driver_version=self.driver_versions[0],
                cuda_driver_version=self.driver_versions[1],
            )
        )

    async def _stream(self) -> None:
        metadata = (("authorization", f"Bearer {self.credential}"),)
        call = self.stub.Connect(metadata=metadata)  # type: ignore[call-arg]
        tasks: list[asyncio.Task[None]] = []
        try:
            self.hello_sent_at = time.monotonic()
            await call.write(self._hello())
            tasks = [
                asyncio.create_task(self._read(call)),
                asyncio.create_task(self._write(call)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended the stream
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
                if ack.telemetry_interval_ms:
                    self.telemetry_interval_ms = ack.telemetry_interval_ms
                self.streams_opened += 1
                self.connected.set()
                log.info("connected to the control plane as host %s", self.host_id)
            command_id = message.command_id
            answer = self._answered.get(command_id) if command_id else None
            if answer is not None:
                self.commands_repeated += 1
                self._acknowledge(command_id, answer)
                continue
            try:
                answer = await self.on_command(message)
            except Exception:  # noqa: BLE001 - one bad command must not end the stream
                log.exception("handling %s failed", message.WhichOneof("msg"))
                continue
            if command_id and answer is not None:
                self._answered[command_id] = answer
                while len(self._answered) > _REMEMBERED_COMMANDS:
                    self._answered.popitem(last=False)
                self._acknowledge(command_id, answer)

    def send(self, message: registry_pb2.DaemonMessage) -> bool:
        """Queues `message` for the stream's writer; False (not sent) while not connected."""
        if not self.connected.is_set():
            return False
        self._outgoing.append(message)
        self._wake.set()
        return True

    def _acknowledge(self, command_id: int, answer: Answer) -> None:
        self._acks.append(registry_pb2.CommandAck(command_id=command_id, answer=answer))
        self._wake.set()

    async def _write(self, call: Call) -> None:
        """The stream's only writer: a heartbeat every interval, telemetry and command
        acknowledgements as they come."""
        next_beat = time.monotonic() + self.heartbeat_interval_ms / 1000
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_beat - time.monotonic()))
            except TimeoutError:
                pass
            self._wake.clear()
            acks, self._acks = self._acks, []
            for ack in acks:
                await call.write(registry_pb2.DaemonMessage(command_ack=ack))
            outgoing, self._outgoing = self._outgoing, []
            for message in outgoing:
                await call.write(message)
            batch, self._pending = self._pending, None
            if batch is not None:
                await call.write(registry_pb2.DaemonMessage(telemetry=batch))
                self.telemetry_sent += 1
            if time.monotonic() >= next_beat:
                now = Timestamp()
                now.GetCurrentTime()
                beat = registry_pb2.Heartbeat(time=now, running_jobs=self.running_jobs())
                await call.write(registry_pb2.DaemonMessage(heartbeat=beat))
                next_beat = time.monotonic() + self.heartbeat_interval_ms / 1000
