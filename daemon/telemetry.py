"""The telemetry loop: one TelemetryBatch of every present GPU per interval, to the Connect stream.

Real GPUs are sampled through NVML (daemon/nvml.py); simulated ones get synthetic figures:
busy (a running job's GPU) means high utilisation, memory, power and clock, idle means 0 %
utilisation, no memory used and idle power; never an ECC error or an XID. A batch that
cannot be sent (the Connect stream is down) is dropped, never queued.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import registry_pb2, types_pb2

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 5000
# NVML's clocksEventReasonGpuIdle: what an idle board reports.
CLOCKS_EVENT_GPU_IDLE = 0x1

Busy = Callable[[], dict[str, str]]
Send = Callable[[registry_pb2.TelemetryBatch], bool]


class Sampler(Protocol):
    def open(self) -> None: ...

    def sample(self, busy: dict[str, str] | None = None) -> list[types_pb2.GpuTelemetry]: ...

    def close(self) -> None: ...


class SimulatedSampler:
    """Plausible figures for simulated GPUs; `busy` maps a GPU UUID to the job on it."""

    def __init__(self, gpus: list[types_pb2.Gpu], seed: int | None = None) -> None:
        self.gpus = list(gpus)
        self._random = random.Random(seed)

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def sample(self, busy: dict[str, str] | None = None) -> list[types_pb2.GpuTelemetry]:
        busy = busy or {}
        now = Timestamp()
        now.GetCurrentTime()
        return [self._one(gpu, busy.get(gpu.uuid, ""), now) for gpu in self.gpus]

    def _one(self, gpu: types_pb2.Gpu, job_id: str, now: Timestamp) -> types_pb2.GpuTelemetry:
        jitter = self._random.uniform
        limit = gpu.power_limit_milliwatts or 300_000
        sample = types_pb2.GpuTelemetry(gpu_uuid=gpu.uuid, time=now)
        if not job_id:
            sample.temperature_celsius = int(jitter(30, 36))
            sample.power_draw_milliwatts = int(limit * jitter(0.12, 0.16))
            sample.sm_clock_mhz = 210
            sample.throttle_reasons = CLOCKS_EVENT_GPU_IDLE
            return sample
        used = int(gpu.memory_total_bytes * jitter(0.55, 0.7))
        sample.utilization_gpu_percent = int(jitter(85, 100))
        sample.utilization_memory_percent = int(jitter(35, 60))
        sample.memory_used_bytes = used
        sample.temperature_celsius = int(jitter(62, 74))
        sample.power_draw_milliwatts = int(limit * jitter(0.7, 0.92))
        sample.sm_clock_mhz = int(jitter(1380, 1410))
        # No real process: pid 0 stands for "the job's container" on a simulated host.
        sample.processes.append(types_pb2.GpuProcess(pid=0, used_memory_bytes=used, job_id=job_id))
        return sample


class TelemetryLoop:
    """Samples every `interval_ms()` (read each round, so a HelloAck can change it) and hands
    the batch to `send`, which returns False when it dropped it."""

    def __init__(
        self, sampler: Sampler, send: Send, interval_ms: Callable[[], int], busy: Busy
    ) -> None:
        self.sampler = sampler
        self.send = send
        self.interval_ms = interval_ms
        self.busy = busy
        self.rounds = 0
        self.dropped = 0
        self.last_round_seconds = 0.0
        self.latest: registry_pb2.TelemetryBatch | None = None

    async def run(self) -> None:
        """Opens the sampler (retrying each interval), samples until cancelled, closes it."""
        while True:
            try:
                await asyncio.to_thread(self.sampler.open)
                break
            except Exception:  # noqa: BLE001 - e.g. NVML not ready yet: jobs run on, retry
                log.exception("opening GPU telemetry failed; retrying")
            await asyncio.sleep(max(self.interval_ms(), 100) / 1000)
        try:
            next_round = time.monotonic()
            while True:
                await self.round()
                next_round += max(self.interval_ms(), 100) / 1000
                # Fixed cadence; after a stall (suspend, a slow round) start afresh from now.
                delay = next_round - time.monotonic()
                if delay < 0:
                    next_round, delay = time.monotonic(), 0.0
                await asyncio.sleep(delay)
        finally:
            await asyncio.to_thread(self.sampler.close)

    async def round(self) -> registry_pb2.TelemetryBatch | None:
        """One sampling round, sent; None when sampling failed (logged, the loop goes on)."""
        batch = registry_pb2.TelemetryBatch()
        batch.time.GetCurrentTime()
        started = time.perf_counter()
        try:
            samples = await asyncio.to_thread(self.sampler.sample, self.busy())
        except Exception:  # noqa: BLE001 - one bad round must not end telemetry
            log.exception("sampling GPU telemetry failed")
            return None
        self.last_round_seconds = time.perf_counter() - started
        batch.samples.extend(samples)
        self.rounds += 1
        self.latest = batch
        if not self.send(batch):
            self.dropped += 1
        return batch
