"""A host whose daemon side is played by the test: registers, heartbeats over Connect, pulls
its dispatch messages from JetStream and publishes the reports the test chooses. Like a
daemon, it acknowledges each stored command (APPLIED) and queues it once; with
`auto_ack=False` the test answers (`ack`) and sees every delivery, re-sends included. Its
heartbeats list the attempts it took and has not ended, as a daemon's do."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import TYPE_CHECKING, Any, TypeVar, overload

import grpc
import nats
from gpuplane.v1 import messaging_pb2, registry_pb2, registry_pb2_grpc, types_pb2
from nats.js.api import ConsumerConfig

from devstack.factories import new_gpus, new_host
from messaging.signing import SIGNATURE_HEADER, SigningKey
from messaging.subjects import events_subject, report_msg_id

if TYPE_CHECKING:
    from tests.harness import JobPlane

Host = TypeVar("Host", bound="ScriptedHost")
TERMINAL = frozenset(
    {
        messaging_pb2.JOB_REPORT_KIND_FINISHED,
        messaging_pb2.JOB_REPORT_KIND_STOPPED,
        messaging_pb2.JOB_REPORT_KIND_FAILED_TO_START,
    }
)


class ScriptedHost:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        nats_url: str,
        token: str,
        *,
        gpus: int = 4,
        model: str = "NVIDIA A100-SXM4-80GB",
        price: int = 2_000_000,
        heartbeat_interval: float = 0.2,
        auto_ack: bool = True,
        signed: bool = True,
    ) -> None:
        self.channel = channel
        self.nats_url = nats_url
        self.token = token
        self.gpu_count = gpus
        self.model = model
        self.price = price
        self.heartbeat_interval = heartbeat_interval
        self.auto_ack = auto_ack
        self.answered: set[int] = set()
        self._writing = asyncio.Lock()  # one write at a time on the Connect stream
        self.machine_id = uuid.uuid4().hex
        self.host_id = ""
        self.credential = ""
        self.commands: asyncio.Queue[registry_pb2.ControlMessage] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._call: Any = None
        self._nc: Any = None
        self._sub: Any = None
        self._seq: dict[tuple[str, int], int] = {}
        # The host's Ed25519 key, registered with it; every report carries its signature.
        # `signed=False` plays a daemon of an earlier release: no key, unsigned reports.
        self.key = SigningKey.generate()
        self.signed = signed
        # What its heartbeats list, as a daemon's do: attempts taken and not ended by a
        # terminal report. Resyncs (acknowledged APPLIED with auto_ack) go to `resyncs`.
        self.taken: set[tuple[str, int]] = set()
        self.resyncs: asyncio.Queue[registry_pb2.ControlMessage] = asyncio.Queue()

    def gpus(self) -> list[types_pb2.Gpu]:
        return new_gpus(
            self.gpu_count, self.model, prefix=self.machine_id[:8], compute_capability="8.0"
        )

    async def register(self) -> registry_pb2.RegisterHostResponse:
        reply = await new_host(
            self.channel,
            self.token,
            machine_id=self.machine_id,
            hostname=f"scripted-{self.machine_id[:6]}",
            gpus=self.gpus(),
            price_per_gpu_hour_micro_credits=self.price,
            signing_public_key=self.key.public_bytes if self.signed else b"",
        )
        self.host_id = reply.host_id
        self.credential = reply.host_credential
        return reply

    async def start(self) -> None:
        """Registers (if needed), opens Connect with heartbeats and the dispatch consumer."""
        if not self.host_id:
            await self.register()
        stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self._call = stub.Connect(  # type: ignore[call-arg]
            metadata=(("authorization", f"Bearer {self.credential}"),)
        )
        await self._write(
            registry_pb2.DaemonMessage(hello=registry_pb2.DaemonHello(host_id=self.host_id))
        )
        first = await self._call.read()
        assert first.WhichOneof("msg") == "hello_ack"
        self._tasks.append(asyncio.create_task(self._heartbeats()))
        self._tasks.append(asyncio.create_task(self._read_commands()))
        self._nc = await nats.connect(self.nats_url)
        js = self._nc.jetstream()
        self._sub = await js.pull_subscribe(
            f"gpuplane.dispatch.{self.host_id}",
            durable=f"host-{self.host_id}",
            stream="DISPATCH",
            config=ConsumerConfig(ack_wait=30),
        )

    async def _write(self, message: registry_pb2.DaemonMessage) -> None:
        async with self._writing:
            await self._call.write(message)

    async def _heartbeats(self) -> None:
        while True:
            running = [
                registry_pb2.RunningJob(job_id=job_id, attempt=attempt)
                for job_id, attempt in sorted(self.taken)
            ]
            beat = registry_pb2.Heartbeat(running_jobs=running)
            await self._write(registry_pb2.DaemonMessage(heartbeat=beat))
            await asyncio.sleep(self.heartbeat_interval)

    async def _read_commands(self) -> None:
        while True:
            message = await self._call.read()
            if message is grpc.aio.EOF:  # type: ignore[attr-defined]
                return
            command_id = message.command_id
            if message.WhichOneof("msg") == "resync":
                await self.resyncs.put(message)
                if command_id and self.auto_ack:
                    await self.ack(command_id)
                continue
            if command_id and self.auto_ack:
                if command_id not in self.answered:
                    await self.commands.put(message)
                await self.ack(command_id)
                continue
            await self.commands.put(message)

    async def ack(
        self,
        command_id: int,
        answer: registry_pb2.CommandAnswer.ValueType = registry_pb2.COMMAND_ANSWER_APPLIED,
    ) -> None:
        """Answers a command on the Connect stream, as a daemon does."""
        self.answered.add(command_id)
        ack = registry_pb2.CommandAck(command_id=command_id, answer=answer)
        await self._write(registry_pb2.DaemonMessage(command_ack=ack))

    async def stop_heartbeats(self) -> None:
        """Plays a dead daemon: heartbeats stop and the Connect stream closes."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # A stream the control plane ended (a revoked host) fails the next write with
            # InvalidStateError ("RPC already finished"), the read with AioRpcError.
            with contextlib.suppress(
                asyncio.CancelledError, grpc.aio.AioRpcError, asyncio.InvalidStateError
            ):
                await task
        self._tasks = []
        if self._call is not None:
            self._call.cancel()

    async def next_dispatch(self, timeout: float = 10.0) -> messaging_pb2.DispatchMessage:
        messages = await self._sub.fetch(1, timeout=timeout)
        message = messages[0]
        await message.ack()
        dispatch = messaging_pb2.DispatchMessage.FromString(message.data)
        self.taken.add((dispatch.job_id, dispatch.attempt))
        assert message.headers is not None
        assert message.headers.get("Nats-Msg-Id") == f"{dispatch.job_id}.{dispatch.attempt}"
        return dispatch

    async def report(
        self,
        dispatch: messaging_pb2.DispatchMessage,
        kind: int,
        *,
        seq: int | None = None,
        **fields: Any,
    ) -> messaging_pb2.JobReport:
        key = (dispatch.job_id, dispatch.attempt)
        if seq is None:
            seq = self._seq.get(key, 0) + 1
        self._seq[key] = max(self._seq.get(key, 0), seq)
        if kind in TERMINAL:
            self.taken.discard(key)
        report = messaging_pb2.JobReport(
            job_id=dispatch.job_id,
            attempt=dispatch.attempt,
            host_id=self.host_id,
            seq=seq,
            kind=kind,  # type: ignore[arg-type]
            **fields,
        )
        data = report.SerializeToString()
        headers = {"Nats-Msg-Id": report_msg_id(dispatch.job_id, dispatch.attempt, seq)}
        if self.signed:
            headers[SIGNATURE_HEADER] = self.key.header(data)
        await self.publish(events_subject(self.host_id, dispatch.job_id), data, headers)
        return report

    async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """Publishes raw bytes on this host's own NATS connection, as its daemon could."""
        await self._nc.jetstream().publish(subject, data, headers=headers)

    async def close(self) -> None:
        await self.stop_heartbeats()
        if self._nc is not None:
            await self._nc.close()


@overload
async def scripted_host(plane: JobPlane, **kw: Any) -> ScriptedHost: ...


@overload
async def scripted_host(plane: JobPlane, kind: type[Host], **kw: Any) -> Host: ...


async def scripted_host(
    plane: JobPlane, kind: type[ScriptedHost] = ScriptedHost, **kw: Any
) -> ScriptedHost:
    """A started host of `kind` registered for the plane's provider with a fresh token."""
    host = kind(plane.channel, plane.nats_url, await plane.token(), **kw)
    await host.start()
    return host
