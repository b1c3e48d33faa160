"""NVML telemetry: one sample per present GPU per round, XID events from a waiting thread.

Semantics (what the control plane receives in each GpuTelemetry):
  utilization_gpu/memory_percent  nvmlDeviceGetUtilizationRates, over the driver's last
                                  sample period (1/6 s to 1 s depending on the board)
  memory_used_bytes               nvmlDeviceGetMemoryInfo().used
  temperature_celsius             nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)
  power_draw_milliwatts           nvmlDeviceGetPowerUsage (whole board, mW)
  sm_clock_mhz                    nvmlDeviceGetClockInfo(NVML_CLOCK_SM), current
  ecc_(un)corrected_errors        nvmlDeviceGetTotalEccErrors(..., NVML_VOLATILE_ECC): since
                                  the driver last loaded, not per interval
  throttle_reasons                nvmlDeviceGetCurrentClocksEventReasons bitmask
                                  (clocksEventReason* / clocksThrottleReason* constants)
  processes                       nvmlDeviceGetComputeRunningProcesses: host PID, bytes,
                                  job id of the gpuplane container owning the PID; at most
                                  64, the largest first when there are more
  xid_events                      each XID once, in the first sample of its GPU after the
                                  event, at most 16 per sample (the rest in the next ones);
                                  time = when the daemon received it (NVML gives none)
A query the GPU does not support (or that this driver lacks) leaves its field 0. A GPU whose
handle lookup by UUID fails, or that answers GPU_IS_LOST, gets no sample in that round: the
control plane reads a GPU missing from a batch as vanished. Its XIDs wait (bounded) until it
is sampled again.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import types_pb2

log = logging.getLogger(__name__)

JobOfPid = Callable[[int], str]
# XIDs kept per GPU between samples; a storm beyond this keeps the newest.
MAX_PENDING_XIDS = 64
# What the control plane accepts in one sample (it drops a sample with more).
MAX_XIDS_PER_SAMPLE = 16
MAX_PROCESSES_PER_SAMPLE = 64


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


class NvmlSampler:
    """Samples the GPUs named by `uuids` through pynvml. Blocking: call open(), sample() and
    close() from worker threads (asyncio.to_thread)."""

    def __init__(
        self, uuids: list[str], job_of_pid: JobOfPid | None = None, xid_wait_ms: int = 500
    ) -> None:
        import pynvml

        self.nvml: Any = pynvml
        self.uuids = list(uuids)
        self.job_of_pid = job_of_pid or (lambda pid: "")
        self.xid_wait_ms = xid_wait_ms
        self._xids: dict[str, collections.deque[types_pb2.XidEvent]] = {
            u: collections.deque(maxlen=MAX_PENDING_XIDS) for u in self.uuids
        }
        self._xid_lock = threading.Lock()
        self._event_set: Any = None
        self._handles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[tuple[str, str]] = set()
        self._unsupported = (self.nvml.NVMLError_NotSupported, self.nvml.NVMLError_FunctionNotFound)

    # ---- lifecycle ---------------------------------------------------------------------

    def open(self) -> None:
        """nvmlInit, and an event set for XIDs on every GPU that supports it."""
        nvml = self.nvml
        nvml.nvmlInit()
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            log.warning("NVML events unavailable (%s): XIDs will not be reported", exc)
            return
        for uuid in self.uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, self._event_set
                )
            except nvml.NVMLError as exc:
                log.warning("GPU %s: XID events unavailable (%s)", uuid, exc)
                continue
            self._handles[_address(handle)] = uuid
        if self._handles:
            self._thread = threading.Thread(
                target=self._watch_xids, name="gpuplane-xid", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.xid_wait_ms / 1000 + 2)
        if self._event_set is not None and (thread is None or not thread.is_alive()):
            try:
                self.nvml.nvmlEventSetFree(self._event_set)
            except self.nvml.NVMLError as exc:
                log.debug("nvmlEventSetFree: %s", exc)
        self._event_set = None
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)

    # ---- sampling ----------------------------------------------------------------------

    def sample(self, busy: dict[str, str] | None = None) -> list[types_pb2.GpuTelemetry]:
        """One round: a sample for each GPU that is present, in inventory order. `busy`
        (GPU → job) is not needed: processes are attributed through their PIDs."""
        samples = []
        for uuid in self.uuids:
            try:
                handle = self.nvml.nvmlDeviceGetHandleByUUID(uuid)
                sample = self._sample_one(uuid, handle)
            except self.nvml.NVMLError as exc:
                self._note_failure(uuid, "handle", exc)
                continue
            self._failing.discard((uuid, "handle"))
            samples.append(sample)
        return samples

    def _sample_one(self, uuid: str, handle: Any) -> types_pb2.GpuTelemetry:
        nvml = self.nvml
        sample = types_pb2.GpuTelemetry(gpu_uuid=uuid, time=_now())
        rates = self._query(uuid, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
        if rates is not None:
            sample.utilization_gpu_percent = int(rates.gpu)
            sample.utilization_memory_percent = int(rates.memory)
        memory = self._query(uuid, "memory", nvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            sample.memory_used_bytes = int(memory.used)
        sample.temperature_celsius = self._number(
            uuid, "temperature", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
        )
        sample.power_draw_milliwatts = self._number(
            uuid, "power", nvml.nvmlDeviceGetPowerUsage, handle
        )
        sample.sm_clock_mhz = self._number(
            uuid, "sm_clock", nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM
        )
        for field, kind in (
            ("ecc_corrected_errors", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("ecc_uncorrected_errors", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        ):
            count = self._number(
                uuid, field, nvml.nvmlDeviceGetTotalEccErrors, handle, kind, nvml.NVML_VOLATILE_ECC
            )
            setattr(sample, field, count)
        sample.throttle_reasons = self._number(uuid, "throttle", self._clock_events, handle)
        running = self._query(uuid, "processes", nvml.nvmlDeviceGetComputeRunningProcesses, handle)
        largest = sorted(running or [], key=lambda p: -int(p.usedGpuMemory or 0))
        for process in largest[:MAX_PROCESSES_PER_SAMPLE]:
            pid = int(process.pid)
            sample.processes.append(
                types_pb2.GpuProcess(
                    pid=pid,
                    used_memory_bytes=int(process.usedGpuMemory or 0),
                    job_id=self.job_of_pid(pid),
                )
            )
        with self._xid_lock:
            pending = self._xids[uuid]
            for _ in range(min(len(pending), MAX_XIDS_PER_SAMPLE)):
                sample.xid_events.append(pending.popleft())
        return sample

    def _clock_events(self, handle: Any) -> int:
        try:
            return int(self.nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
        except self.nvml.NVMLError_FunctionNotFound:  # drivers before 535
            return int(self.nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    def _query(self, uuid: str, name: str, function: Callable[..., Any], *args: Any) -> Any:
        """function(*args); None when unsupported or failing. GPU_IS_LOST propagates: the
        whole sample of this GPU is dropped."""
        try:
            value = function(*args)
        except self._unsupported:
            return None
        except self.nvml.NVMLError_GpuIsLost:
            raise
        except self.nvml.NVMLError as exc:
            self._note_failure(uuid, name, exc)
            return None
        self._failing.discard((uuid, name))
        return value

    def _number(self, uuid: str, name: str, function: Callable[..., Any], *args: Any) -> int:
        value = self._query(uuid, name, function, *args)
        return int(value) if value is not None else 0

    def _note_failure(self, uuid: str, name: str, exc: Exception) -> None:
        """Logs a failing query once until it works again, not on every round."""
        if (uuid, name) not in self._failing:
            self._failing.add((uuid, name))
            what = "gone: no samples until it is back" if name == "handle" else f"{name} failed"
            log.warning("GPU %s %s (%s)", uuid, what, exc)

    # ---- XIDs --------------------------------------------------------------------------

    def _watch_xids(self) -> None:
        nvml = self.nvml
        while not self._stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(self._event_set, self.xid_wait_ms)
            except nvml.NVMLError_Timeout:
                continue
            except nvml.NVMLError as exc:
                log.warning("waiting for NVML events failed: %s", exc)
                self._stop.wait(self.xid_wait_ms / 1000)
                continue
            if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
                continue
            uuid = self._handles.get(_address(data.device))
            if uuid is None:
                continue
            event = types_pb2.XidEvent(xid=int(data.eventData), time=_now())
            log.warning("GPU %s: XID %d", uuid, event.xid)
            with self._xid_lock:
                self._xids[uuid].append(event)


def _address(handle: Any) -> int:
    """The device handle's pointer value: stable per GPU, comparable across calls."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)
