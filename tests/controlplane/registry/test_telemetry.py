"""Telemetry over Connect against a real control plane (NATS, S3): GetHost's latest and recent
samples, /metrics, rejected samples, GPU health from XIDs, ECC growth and vanished GPUs, the
scheduler avoiding unhealthy GPUs until they are clean again, and job usage in GetJob."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import messaging_pb2, registry_pb2, registry_pb2_grpc, types_pb2
from prometheus_client.utils import floatToGoString

from devstack.factories import GIB
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import JobPlane

S = types_pb2
pytestmark = [
    pytest.mark.timeout(30),
    # GPU health clears fast, and GetHost keeps a short history.
    pytest.mark.plane(gpu_clean_period_seconds=1.0, telemetry_history=5),
]


class TelemetryHost(ScriptedHost):
    """A scripted host that also sends telemetry batches, and can reconnect after a stop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = asyncio.Lock()
        self.running: list[registry_pb2.RunningJob] = []
        self._clock = time.time()
        self._pump: asyncio.Task[None] | None = None

    def uuid(self, index: int) -> str:
        return self.gpus()[index].uuid

    async def write(self, message: registry_pb2.DaemonMessage) -> None:
        async with self._write_lock:  # heartbeats and batches share the stream
            await self._call.write(message)

    async def _heartbeats(self) -> None:
        while True:
            beat = registry_pb2.Heartbeat(running_jobs=self.running)
            await self.write(registry_pb2.DaemonMessage(heartbeat=beat))
            await asyncio.sleep(self.heartbeat_interval)

    def sample(self, index: int, **fields: Any) -> types_pb2.GpuTelemetry:
        fields.setdefault("utilization_gpu_percent", 30 + index)
        fields.setdefault("memory_used_bytes", (index + 1) * GIB)
        fields.setdefault("temperature_celsius", 55)
        fields.setdefault("power_draw_milliwatts", 250_000)
        fields.setdefault("sm_clock_mhz", 1_410)
        return types_pb2.GpuTelemetry(gpu_uuid=self.uuid(index), **fields)

    async def send(self, *samples: types_pb2.GpuTelemetry) -> None:
        """One batch, stamped a little later than the last (the daemon's clock moves on)."""
        self._clock = max(self._clock + 0.001, time.time())
        stamp = Timestamp()
        stamp.FromNanoseconds(int(self._clock * 1e9))
        batch = registry_pb2.TelemetryBatch(time=stamp, samples=samples)
        await self.write(registry_pb2.DaemonMessage(telemetry=batch))

    async def send_round(self, **overrides: Any) -> None:
        """A batch listing every GPU; `overrides` maps a GPU index to its sample's fields."""
        await self.send(
            *(self.sample(i, **overrides.get(str(i), {})) for i in range(self.gpu_count))
        )

    def pump(self, interval: float = 0.05) -> None:
        """Sends clean rounds in the background until stop_pump()."""

        async def loop() -> None:
            while True:
                await self.send_round()
                await asyncio.sleep(interval)

        self._pump = asyncio.create_task(loop())

    async def stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None

    async def open_stream(self) -> None:
        """Connects again (after stop_heartbeats) with the same credential."""
        stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self._call = stub.Connect(  # type: ignore[call-arg]
            metadata=(("authorization", f"Bearer {self.credential}"),)
        )
        await self._call.write(
            registry_pb2.DaemonMessage(hello=registry_pb2.DaemonHello(host_id=self.host_id))
        )
        first = await self._call.read()
        assert first.WhichOneof("msg") == "hello_ack"
        self._tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._read_commands()),
        ]

    async def close(self) -> None:
        await self.stop_pump()
        await super().close()


async def telemetry_host(plane: JobPlane, **kw: Any) -> TelemetryHost:
    return await scripted_host(plane, TelemetryHost, **kw)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    """Polls `check` until it returns a truthy value; returns it. What these tests assert is
    the outcome, not its latency: 5 s ran out once in a slow full run while the monitor had
    already logged both changes."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {value!r}")
        await asyncio.sleep(0.05)


async def get_host(plane: JobPlane, host_id: str) -> types_pb2.Host:
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    reply = await stub.GetHost(registry_pb2.GetHostRequest(host_id=host_id), metadata=plane.auth())
    return reply.host


async def scrape(plane: JobPlane) -> str:
    url = f"http://127.0.0.1:{plane.plane.metrics_port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)


async def test_get_host_and_metrics_show_telemetry_invalid_samples_are_counted(
    plane: JobPlane,
) -> None:
    host = await telemetry_host(plane, gpus=2)
    try:
        for i in range(8):
            await host.send_round(**{"0": {"utilization_gpu_percent": i}})
        await host.send_round(**{"1": {"temperature_celsius": 400}})  # rejected, not stored

        async def seen() -> types_pb2.Host | None:
            shown = await get_host(plane, host.host_id)
            return shown if shown.gpus[0].latest.utilization_gpu_percent == 30 else None

        shown = await eventually(seen)
        first, second = shown.gpus
        # The configured history (5), oldest first.
        assert [s.utilization_gpu_percent for s in first.recent] == [4, 5, 6, 7, 30]
        assert second.latest.temperature_celsius == 55
        assert all(s.temperature_celsius == 55 for s in second.recent)
        assert first.healthy
        assert second.healthy

        text = await scrape(plane)
        labels = f'gpu="{host.uuid(1)}",host="{host.host_id}"'
        for name, value in [
            ("temperature_celsius", 55),
            ("power_watts", 250),
            ("sm_clock_hertz", 1.41e9),
            ("memory_used_bytes", 2 * GIB),
            ("utilization_percent", 31),
            ("ecc_uncorrected_errors_total", 0),
            ("healthy", 1),
        ]:
            shown = floatToGoString(value)  # type: ignore[no-untyped-call]
            assert f"gpuplane_gpu_{name}{{{labels}}} {shown}\n" in text, name
        assert 'gpuplane_telemetry_rejected_samples_total{reason="temperature"} 1.0' in text
        assert "gpuplane_telemetry_samples_total 17.0" in text

        # Lost: its series leave /metrics (bounded cardinality), and GetHost has no samples.
        await host.stop_heartbeats()

        async def lost() -> types_pb2.Host | None:
            shown = await get_host(plane, host.host_id)
            return shown if shown.state == S.HOST_STATE_LOST else None

        shown = await eventually(lost, timeout=8)
        assert not shown.gpus[0].HasField("latest")
        assert host.host_id not in await scrape(plane)
    finally:
        await host.close()


async def test_unhealthy_gpu_is_skipped_until_clean(plane: JobPlane) -> None:
    """An XID takes the only H100 out of service: an H100 job waits while an A100 job runs on
    the other host; after the clean period the H100 is healthy and the job is placed."""
    h100 = await telemetry_host(plane, gpus=1, model="NVIDIA H100 80GB HBM3")
    a100 = await telemetry_host(plane, gpus=1)
    try:
        xid = S.XidEvent(xid=79, time=Timestamp(seconds=1_790_000_000))
        await h100.send_round(**{"0": {"xid_events": [xid]}})

        async def unhealthy() -> types_pb2.Gpu | None:
            gpu = (await get_host(plane, h100.host_id)).gpus[0]
            return gpu if not gpu.healthy else None

        gpu = await eventually(unhealthy)
        assert gpu.unhealthy_reason == "XID 79 at 2026-09-21T14:13:20Z"
        # The fault counts against the host's reliability (offers, balanced placement): one
        # bad outcome over the 90 % prior worth five outcomes, (0 + 4.5) / 6.
        assert (await get_host(plane, h100.host_id)).reliability_permille == 750
        # The provider's other host, with no outcome of its own, stands where its provider
        # does: a provider's fresh hosts do not start from scratch.
        assert (await get_host(plane, a100.host_id)).reliability_permille == 750
        waiting = await plane.submit(gpu_count=1, gpu_models=["H100"])
        other = await plane.submit(gpu_count=1, gpu_models=["A100"])
        placed = await a100.next_dispatch()
        assert placed.job_id == other.job_id
        await asyncio.sleep(0.5)
        assert (await plane.get(waiting.job_id)).state == S.JOB_STATE_QUEUED

        h100.pump()  # clean rounds: healthy again after the (1 s) clean period
        dispatch = await h100.next_dispatch(timeout=8)
        assert dispatch.job_id == waiting.job_id
        gpu = (await get_host(plane, h100.host_id)).gpus[0]
        assert gpu.healthy
        assert gpu.unhealthy_reason == ""
        assert gpu.job_id == waiting.job_id
    finally:
        await h100.close()
        await a100.close()


async def test_ecc_growth_and_vanished_gpu_leave_the_job_running(
    plane: JobPlane, caplog: pytest.LogCaptureFixture
) -> None:
    host = await telemetry_host(plane, gpus=2)
    try:
        job = await plane.submit(gpu_count=1)
        dispatch = await host.next_dispatch()
        await host.report(dispatch, messaging_pb2.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        busy = [g.uuid for g in host.gpus()].index(dispatch.gpu_uuids[0])
        idle = 1 - busy
        await host.send_round(**{str(busy): {"ecc_uncorrected_errors": 3}})
        await host.send_round(**{str(busy): {"ecc_uncorrected_errors": 5}})
        await host.send(host.sample(busy, ecc_uncorrected_errors=5))  # the idle GPU is missing

        async def both_unhealthy() -> types_pb2.Host | None:
            shown = await get_host(plane, host.host_id)
            return shown if not any(g.healthy for g in shown.gpus) else None

        shown = await eventually(both_unhealthy)
        assert shown.gpus[busy].unhealthy_reason == "uncorrectable ECC errors 3 → 5"
        assert shown.gpus[busy].job_id == job.job_id
        assert shown.gpus[idle].unhealthy_reason == "GPU vanished from telemetry"
        assert any(job.job_id in r.getMessage() for r in caplog.records)
        # Nothing destructive: the job runs on and no command was sent to the host.
        assert (await plane.get(job.job_id)).state == S.JOB_STATE_RUNNING
        assert host.commands.empty()
        stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
        listed = await stub.ListHosts(registry_pb2.ListHostsRequest(), metadata=plane.auth())
        assert [g.healthy for g in listed.hosts[0].gpus] == [False, False]
    finally:
        await host.close()


async def test_job_usage_from_telemetry_in_get_job(plane: JobPlane) -> None:
    host = await telemetry_host(plane, gpus=2)
    try:
        job = await plane.submit(gpu_count=2)
        dispatch = await host.next_dispatch()
        await host.report(dispatch, messaging_pb2.JOB_REPORT_KIND_RUNNING)
        host.running = [registry_pb2.RunningJob(job_id=job.job_id, attempt=1)]

        def process(gib: int) -> types_pb2.GpuProcess:
            return S.GpuProcess(pid=7, used_memory_bytes=gib * GIB, job_id=job.job_id)

        async def usage() -> types_pb2.JobUsage | None:
            await host.send_round(
                **{
                    "0": {"utilization_gpu_percent": 40, "processes": [process(3), process(2)]},
                    "1": {"utilization_gpu_percent": 80, "processes": [process(4)]},
                }
            )
            got = (await plane.get(job.job_id)).usage
            return got if got.avg_gpu_utilization_percent else None

        got = await eventually(usage)
        assert got.avg_gpu_utilization_percent == 60
        assert got.peak_gpu_memory_bytes == 5 * GIB  # both its processes on GPU 0
    finally:
        await host.close()
