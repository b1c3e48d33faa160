"""Simulated provider hosts for the telemetry benchmarks: `python -m bench.hostsim SPEC`.

Each process registers its share of hosts, opens one Connect stream per host (each on its own
channel and TCP connection, as daemons do), heartbeats, and sends one TelemetryBatch per round
listing every GPU.
Batches are assembled from pre-encoded bytes (only the timestamp changes), so a client costs
little and the control plane is what is measured. Prints {"ready": true} once every host is
connected and sending, and a HostReport line when its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from daemon.channel import PLAINTEXT, ChannelSecurity, open_channel
from daemon.identity import RETRIED

CONNECT = "/gpuplane.v1.RegistryService/Connect"
# Answers after which a daemon tries again (the control plane is busy or restarting): the
# daemon's own list (daemon/identity.py).
RETRYABLE = RETRIED
GIB = 1 << 30
# A write to a Connect stream that the control plane ended (or is ending).
ENDED = (grpc.aio.AioRpcError, asyncio.InvalidStateError)


@dataclass
class HostSpec:
    target: str
    token: str
    hosts: int
    gpus: int = 8
    # Telemetry batches per second per host: 0 = as fast as the server takes them, < 0 = none.
    batches_per_second: float = 0.0
    heartbeat_interval: float = 2.0
    # A control plane serving TLS: the CA verifying it (and a client certificate when it
    # requires one). Empty = plaintext, for loopback benchmarks.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def channel(self) -> grpc.aio.Channel:
        # Each host on a TCP connection of its own, as each daemon is: gRPC would otherwise
        # carry every channel of this process with one target over one shared connection.
        own = (("grpc.use_local_subchannel_pool", 1),)
        if not self.ca_file:
            return open_channel(self.target, PLAINTEXT, own)
        security = ChannelSecurity(
            ca_file=Path(self.ca_file),
            cert_file=Path(self.cert_file) if self.cert_file else None,
            key_file=Path(self.key_file) if self.key_file else None,
        )
        return open_channel(self.target, security, own)


@dataclass
class HostReport:
    hosts: int
    sent_samples: int
    seconds: float
    errors: int
    first_error: str = ""
    # Connect streams the control plane ended that the hosts opened again.
    reconnects: int = 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _gpus(machine: str, count: int) -> list[types_pb2.Gpu]:
    return [
        types_pb2.Gpu(
            uuid=f"GPU-{machine}-{i}",
            index=i,
            name="NVIDIA H100 80GB HBM3",
            memory_total_bytes=80 * GIB,
            compute_capability="9.0",
        )
        for i in range(count)
    ]


def encoded_samples(gpus: list[types_pb2.Gpu]) -> bytes:
    """TelemetryBatch field 2 (the samples) of one round, encoded once."""
    samples = [
        types_pb2.GpuTelemetry(
            gpu_uuid=gpu.uuid,
            utilization_gpu_percent=87,
            utilization_memory_percent=40,
            memory_used_bytes=61 * GIB,
            temperature_celsius=71,
            power_draw_milliwatts=612_000,
            sm_clock_mhz=1_980,
            processes=[types_pb2.GpuProcess(pid=4242, used_memory_bytes=60 * GIB)],
        )
        for gpu in gpus
    ]
    return registry_pb2.TelemetryBatch(samples=samples).SerializeToString()


def telemetry_message(samples: bytes) -> bytes:
    """DaemonMessage{telemetry: TelemetryBatch{time: now, samples}} without re-encoding."""
    now = time.time_ns()
    stamp = Timestamp(seconds=now // 1_000_000_000, nanos=now % 1_000_000_000)
    encoded = stamp.SerializeToString()
    batch = b"\x0a" + _varint(len(encoded)) + encoded + samples
    return b"\x1a" + _varint(len(batch)) + batch


class SimulatedHost:
    def __init__(self, spec: HostSpec, channel: grpc.aio.Channel) -> None:
        self.spec = spec
        self.channel = channel
        self.machine = uuid.uuid4().hex[:12]
        self.gpus = _gpus(self.machine, spec.gpus)
        self.sent = 0
        self.call: Any = None
        self.host_id = ""
        self.credential: tuple[tuple[str, str], ...] = ()
        self.reconnects = 0
        self.lock = asyncio.Lock()
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self) -> None:
        """Registers, opens Connect (hello, HelloAck) and starts heartbeating; like a daemon
        (daemon/identity.py), retries with jittered backoff for as long as the control plane
        answers "busy, retry" (the bench bounds the whole connect phase); any other answer
        ends the simulator. A simulator that gave up after eight tries ended a 10,000-host run
        while gRPC shed load, where a daemon would have gone on trying."""
        attempt = 0
        while True:
            try:
                await self._connect_once()
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(random.uniform(0, min(8.0, 0.25 * 2**attempt)))
                attempt = min(attempt + 1, 6)

    async def _connect_once(self) -> None:
        reply = await registry_pb2_grpc.RegistryServiceStub(self.channel).RegisterHost(
            registry_pb2.RegisterHostRequest(
                registration_token=self.spec.token,
                machine_id=self.machine,
                hostname=f"bench-{self.machine}",
                gpus=self.gpus,
                simulated=True,
                price_per_gpu_hour_micro_credits=2_000_000,
                location="bench",
            )
        )
        self.host_id = reply.host_id
        self.credential = (("authorization", f"Bearer {reply.host_credential}"),)
        await self._open()
        self.tasks = [
            asyncio.create_task(self._drain()),
            asyncio.create_task(self._heartbeats()),
        ]

    async def _open(self) -> None:
        """Opens the Connect stream: hello, then the HelloAck."""
        connect = self.channel.stream_stream(CONNECT, None, None)  # raw bytes both ways
        call = connect(metadata=self.credential)  # type: ignore[call-arg]
        hello = registry_pb2.DaemonHello(host_id=self.host_id, gpus=self.gpus)
        await call.write(registry_pb2.DaemonMessage(hello=hello).SerializeToString())
        reply = await call.read()  # the HelloAck
        if reply is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise ConnectionError("the control plane ended Connect before its HelloAck")
        self.call = call

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.call is not None:
            self.call.cancel()

    async def _drain(self) -> None:
        """Reads what the control plane sends; when it ends the stream (a restart, or an
        answer like UNAVAILABLE), connects again with jittered backoff, as the daemon does."""
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await self.call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    pass
            self.reconnects += 1
            async with self.lock:
                self.call.cancel()
                for attempt in itertools.count():
                    await asyncio.sleep(random.uniform(0, min(8.0, 0.25 * 2**attempt)))
                    with contextlib.suppress(grpc.aio.AioRpcError, ConnectionError):
                        await self._open()
                        break

    async def _heartbeats(self) -> None:
        while True:
            # Stamped as the daemon does: the control plane measures its processing lag.
            beat = registry_pb2.Heartbeat()
            beat.time.GetCurrentTime()
            message = registry_pb2.DaemonMessage(heartbeat=beat).SerializeToString()
            async with self.lock:
                with contextlib.suppress(*ENDED):  # _drain connects again
                    await self.call.write(message)
            await asyncio.sleep(self.spec.heartbeat_interval)

    async def telemetry(self) -> None:
        """Sends rounds at the spec's rate (or as fast as they are taken) until cancelled."""
        samples = encoded_samples(self.gpus)
        rate = self.spec.batches_per_second
        period = 1.0 / rate if rate else 0.0
        # Spread the hosts' rounds over the period instead of sending them all at once.
        due = time.monotonic() + period * random.random()
        while True:
            if period:
                due += period
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            async with self.lock:
                try:
                    await self.call.write(telemetry_message(samples))
                except ENDED:  # _drain connects again; this round is not sent
                    await asyncio.sleep(0.05)
                    continue
            self.sent += self.spec.gpus


async def drive(spec: HostSpec) -> HostReport:
    """Connects the hosts, prints a ready line, sends telemetry until stdin closes."""
    channels = [spec.channel() for _ in range(spec.hosts)]
    hosts = [SimulatedHost(spec, channel) for channel in channels]
    try:
        await asyncio.gather(*(h.connect() for h in hosts))
        pumps = (
            [asyncio.create_task(h.telemetry()) for h in hosts]
            if spec.batches_per_second >= 0
            else []
        )
        started = time.monotonic()
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.read)
        elapsed = time.monotonic() - started
        failed = [p for p in pumps if p.done() and p.exception() is not None]
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.gather(*(h.stop() for h in hosts))
    finally:
        await asyncio.gather(*(c.close(None) for c in channels))
    return HostReport(
        hosts=spec.hosts,
        sent_samples=sum(h.sent for h in hosts),
        seconds=round(elapsed, 3),
        errors=len(failed),
        first_error=repr(failed[0].exception()) if failed else "",
        reconnects=sum(h.reconnects for h in hosts),
    )


async def spawn(spec: HostSpec, log: IO[bytes]) -> asyncio.subprocess.Process:
    """`python -m bench.hostsim SPEC` as a child (its stdout: the report; closing its stdin
    stops it), its stderr to `log`."""
    from bench.resources import child_env

    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.hostsim",
        json.dumps(asdict(spec)),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
        env=child_env(),
    )


def main() -> None:
    report = asyncio.run(drive(HostSpec(**json.loads(sys.argv[1]))))
    sys.stdout.write(json.dumps(asdict(report)) + "\n")


if __name__ == "__main__":
    main()
