"""GPU scrub after each attempt: no process left, memory back to baseline; else quarantined.

The baseline of a GPU is the memory NVML reports used on it when the daemon starts (idle: the
driver's own reservation), lowered whenever a later check reads less. A check polls every
`POLL_SECONDS` until each GPU is clean or `timeout` passes (the driver frees a dead process's
memory shortly after it exits). A GPU that is not clean is quarantined: the agent refuses
dispatches naming it (GPU_QUARANTINED), telemetry carries `quarantine_reason` so the control
plane marks it unhealthy (not offered), and `recheck()` releases it once it reads clean.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import messaging_pb2, registry_pb2, types_pb2

from daemon.gpus import GpuInventory
from daemon.settings import DaemonSettings

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class GpuState:
    """What NVML says of one GPU now."""

    pids: tuple[int, ...]
    memory_used: int


class GpuReader(Protocol):
    """Reads a GPU's compute processes and memory used (blocking)."""

    measured: bool

    def read(self, uuid: str) -> GpuState: ...


class SimulatedReader:
    """Simulated GPUs: nothing is left on them, ever (nothing is measured)."""

    measured = False

    def read(self, uuid: str) -> GpuState:
        return GpuState((), 0)


class NvmlReader:
    """NVML's view: nvmlDeviceGetComputeRunningProcesses and nvmlDeviceGetMemoryInfo."""

    measured = True

    def __init__(self) -> None:
        import pynvml

        self.nvml: Any = pynvml
        self._open = False

    def read(self, uuid: str) -> GpuState:
        nvml = self.nvml
        if not self._open:
            nvml.nvmlInit()  # counted by NVML; this reader keeps its one init for its life
            self._open = True
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        processes = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        return GpuState(tuple(int(p.pid) for p in processes), used)


class Scrubber:
    """Checks GPUs after attempts, keeps their baselines and the quarantine."""

    def __init__(
        self, reader: GpuReader, *, timeout: float = 10.0, slack_bytes: int = 64 << 20
    ) -> None:
        self.reader = reader
        self.timeout = timeout
        self.slack_bytes = slack_bytes
        self.baseline: dict[str, int] = {}
        # GPU uuid → why it is quarantined.
        self.quarantined: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def calibrate(self, uuids: Iterable[str]) -> None:
        """Baselines from the GPUs as they are now (the daemon's start); a GPU that already
        holds processes has none yet and is quarantined until a check reads it clean."""
        for uuid in uuids:
            state = await asyncio.to_thread(self._read, uuid)
            if state is None:
                continue
            if state.pids:
                self.quarantined[uuid] = _pids_reason(state.pids)
                log.warning("GPU %s holds processes at start: quarantined", uuid)
            else:
                self.baseline[uuid] = state.memory_used

    async def check(self, uuids: Iterable[str]) -> types_pb2.ScrubAttestation:
        """Scrubs `uuids` once their attempt's container is gone; returns the attestation,
        quarantining (or releasing) each GPU by what it found."""
        wanted = list(dict.fromkeys(uuids))
        async with self._lock:
            scrubs = await self._poll(wanted, time.monotonic() + self.timeout)
        attestation = types_pb2.ScrubAttestation(
            gpus=scrubs,
            clean=all(s.clean for s in scrubs),
            checked_at=_now(),
            measured=self.reader.measured,
        )
        for scrub in scrubs:
            self._note(scrub)
        return attestation

    async def recheck(self) -> list[str]:
        """Checks each quarantined GPU once (no waiting); returns those released."""
        if not self.quarantined:
            return []
        async with self._lock:
            scrubs = await self._poll(list(self.quarantined), time.monotonic())
        for scrub in scrubs:
            self._note(scrub)
        return [s.gpu_uuid for s in scrubs if s.clean]

    def blocked(self, uuids: Iterable[str]) -> dict[str, str]:
        """Those of `uuids` in quarantine, with why."""
        return {u: self.quarantined[u] for u in uuids if u in self.quarantined}

    async def _poll(self, uuids: list[str], deadline: float) -> list[types_pb2.GpuScrub]:
        while True:
            scrubs = [await asyncio.to_thread(self._scrub_one, uuid) for uuid in uuids]
            if all(s.clean for s in scrubs) or time.monotonic() >= deadline:
                return scrubs
            await asyncio.sleep(POLL_SECONDS)

    def _scrub_one(self, uuid: str) -> types_pb2.GpuScrub:
        state = self._read(uuid)
        if state is None:
            return types_pb2.GpuScrub(gpu_uuid=uuid, clean=False, reason="NVML cannot read it")
        baseline = self.baseline.get(uuid, state.memory_used)
        scrub = types_pb2.GpuScrub(
            gpu_uuid=uuid,
            leftover_pids=list(state.pids),
            memory_used_bytes=state.memory_used,
            baseline_memory_bytes=baseline,
        )
        if state.pids:
            scrub.reason = _pids_reason(state.pids)
        elif state.memory_used > baseline + self.slack_bytes:
            over = (state.memory_used - baseline) >> 20
            scrub.reason = f"{over} MiB of memory still used above its baseline"
        scrub.clean = not scrub.reason
        return scrub

    def _read(self, uuid: str) -> GpuState | None:
        try:
            return self.reader.read(uuid)
        except Exception as exc:  # noqa: BLE001 - an NVML error makes the GPU not clean
            log.warning("reading GPU %s for the scrub failed: %s", uuid, exc)
            return None

    def _note(self, scrub: types_pb2.GpuScrub) -> None:
        uuid = scrub.gpu_uuid
        if scrub.clean:
            if uuid in self.quarantined:
                log.info("GPU %s is clean again: out of quarantine", uuid)
            self.quarantined.pop(uuid, None)
            if uuid not in self.baseline or scrub.memory_used_bytes < self.baseline[uuid]:
                self.baseline[uuid] = scrub.memory_used_bytes
            return
        if uuid not in self.quarantined:
            log.warning("GPU %s is not clean (%s): quarantined", uuid, scrub.reason)
        self.quarantined[uuid] = scrub.reason


def _pids_reason(pids: Iterable[int]) -> str:
    listed = sorted(pids)
    shown = ", ".join(str(p) for p in listed[:8]) + (" …" if len(listed) > 8 else "")
    return f"{len(listed)} process(es) left on it (pid {shown})"


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


async def scrubber_for(
    settings: DaemonSettings, inventory: GpuInventory, journaled: Iterable[str]
) -> Scrubber:
    """The daemon's scrubber, its baselines read from the GPUs no attempt journaled by an
    earlier run of the daemon holds (`journaled`: their dispatches, base64)."""
    reader: GpuReader = SimulatedReader() if inventory.simulated else NvmlReader()
    scrubber = Scrubber(
        reader,
        timeout=settings.scrub_timeout_seconds,
        slack_bytes=settings.scrub_memory_slack_bytes,
    )
    busy = journaled_gpus(journaled)
    await scrubber.calibrate(g.uuid for g in inventory.gpus if g.uuid not in busy)
    return scrubber


def journaled_gpus(dispatches_b64: Iterable[str]) -> set[str]:
    """The GPUs of attempts an earlier run of the daemon journaled (busy, not leftovers)."""
    busy: set[str] = set()
    for encoded in dispatches_b64:
        try:
            dispatch = messaging_pb2.DispatchMessage.FromString(base64.b64decode(encoded))
        except (ValueError, DecodeError):
            continue
        busy.update(dispatch.gpu_uuids)
    return busy


def mark_quarantined(
    batch: registry_pb2.TelemetryBatch, quarantined: dict[str, str]
) -> registry_pb2.TelemetryBatch:
    """Sets `quarantine_reason` on the samples of quarantined GPUs (in place)."""
    if quarantined:
        for sample in batch.samples:
            sample.quarantine_reason = quarantined.get(sample.gpu_uuid, "")
    return batch


async def recheck_forever(scrubber: Scrubber, interval: float) -> None:
    """Re-reads quarantined GPUs every `interval` seconds, releasing the clean ones."""
    while True:
        await asyncio.sleep(interval)
        await scrubber.recheck()
