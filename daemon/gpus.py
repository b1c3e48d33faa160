"""The host's GPUs: fingerprinted through NVML (pynvml), or simulated for dev and tests."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from gpuplane.v1 import types_pb2

from daemon.settings import DaemonSettings

GIB = 1 << 30


class NoGpuError(RuntimeError):
    """NVML is missing or sees no GPU; the message says what to do instead."""


class UnknownGpuModel(ValueError):
    """A --simulate-gpus value names a model we have no fingerprint for, or is malformed."""


@dataclass(frozen=True)
class GpuModel:
    name: str
    memory_gib: int
    compute_capability: str
    power_limit_watts: int


# Fingerprints of the simulated models: NVML names and figures of the real boards.
SIMULATED_MODELS: dict[str, GpuModel] = {
    "A100-80GB": GpuModel("NVIDIA A100-SXM4-80GB", 80, "8.0", 400),
    "A100-40GB": GpuModel("NVIDIA A100-SXM4-40GB", 40, "8.0", 400),
    "H100": GpuModel("NVIDIA H100 80GB HBM3", 80, "9.0", 700),
    "L4": GpuModel("NVIDIA L4", 24, "8.9", 72),
    "A10G": GpuModel("NVIDIA A10G", 24, "8.6", 300),
    "T4": GpuModel("Tesla T4", 16, "7.5", 70),
    "RTX4090": GpuModel("NVIDIA GeForce RTX 4090", 24, "8.9", 450),
}
_SPEC = re.compile(r"^\s*(?:(\d+)\s*[xX]\s*)?([A-Za-z0-9-]+)\s*$")


@dataclass
class GpuInventory:
    """What this host offers: its GPUs and the driver they run under."""

    gpus: list[types_pb2.Gpu]
    driver_version: str = ""
    cuda_driver_version: str = ""
    simulated: bool = False
    by_uuid: dict[str, types_pb2.Gpu] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_uuid = {g.uuid: g for g in self.gpus}

    def missing(self, uuids: list[str]) -> list[str]:
        """The UUIDs in `uuids` that this host does not have."""
        return [u for u in uuids if u not in self.by_uuid]


def simulated_gpus(spec: str, machine_id: str) -> GpuInventory:
    """GPUs from a spec like "4xA100-80GB" or "2xH100,1xL4"; UUIDs are derived from
    `machine_id` and the index, so they are the same on every start of this host."""
    known = ", ".join(SIMULATED_MODELS)
    gpus: list[types_pb2.Gpu] = []
    for part in spec.split(","):
        match = _SPEC.match(part)
        if match is None:
            raise UnknownGpuModel(
                f"--simulate-gpus {spec!r}: expected COUNTxMODEL (e.g. 4xA100-80GB), "
                f"comma-separated; known models: {known}"
            )
        count = int(match.group(1) or 1)
        wanted = match.group(2).upper()
        model_key = next((k for k in SIMULATED_MODELS if k.upper() == wanted), None)
        if model_key is None:
            raise UnknownGpuModel(
                f"--simulate-gpus: unknown GPU model {match.group(2)!r}; known models: {known}"
            )
        if not 1 <= count <= 64:
            raise UnknownGpuModel(f"--simulate-gpus: count {count} is not between 1 and 64")
        model = SIMULATED_MODELS[model_key]
        for _ in range(count):
            index = len(gpus)
            gpus.append(
                types_pb2.Gpu(
                    uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'{machine_id}/{index}')}",
                    index=index,
                    name=model.name,
                    memory_total_bytes=model.memory_gib * GIB,
                    compute_capability=model.compute_capability,
                    pci_bus_id=f"00000000:{0x18 + index:02X}:00.0",
                    mig_mode=types_pb2.MIG_MODE_DISABLED,
                    power_limit_milliwatts=model.power_limit_watts * 1000,
                    healthy=True,
                )
            )
    return GpuInventory(gpus, "simulated", "simulated", simulated=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version(value: int) -> str:
    """NVML encodes the CUDA driver version as 1000 * major + 10 * minor."""
    return f"{value // 1000}.{value % 1000 // 10}"


def _mig_mode(pynvml: Any, handle: Any) -> int:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
        return types_pb2.MIG_MODE_NOT_SUPPORTED
    if current == pynvml.NVML_DEVICE_MIG_ENABLE:
        return types_pb2.MIG_MODE_ENABLED
    return types_pb2.MIG_MODE_DISABLED


def _power_limit(pynvml: Any, handle: Any) -> int:
    try:
        return int(pynvml.nvmlDeviceGetPowerManagementLimit(handle))
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
        return 0


def _device(pynvml: Any, index: int) -> types_pb2.Gpu:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    return types_pb2.Gpu(
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
        compute_capability=f"{major}.{minor}",
        pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
        mig_mode=_mig_mode(pynvml, handle),  # type: ignore[arg-type]
        power_limit_milliwatts=_power_limit(pynvml, handle),
        healthy=True,
    )


def nvml_gpus() -> GpuInventory:
    """Fingerprints every GPU NVML sees (blocking: call it through asyncio.to_thread)."""
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NoGpuError("the pynvml module (nvidia-ml-py) is not installed") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoGpuError(f"NVML is not usable on this machine: {exc}") from exc
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            raise NoGpuError("NVML found no GPU on this machine")
        gpus = [_device(pynvml, index) for index in range(count)]
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        cuda = _cuda_version(int(pynvml.nvmlSystemGetCudaDriverVersion()))
    except pynvml.NVMLError as exc:
        raise NoGpuError(f"NVML failed while listing GPUs: {exc}") from exc
    finally:
        pynvml.nvmlShutdown()
    return GpuInventory(gpus, driver, cuda, simulated=False)


def discover(settings: DaemonSettings) -> GpuInventory:
    """Simulated GPUs when asked, else NVML's; refuses (NoGpuError) without either."""
    if settings.simulate_gpus:
        return simulated_gpus(settings.simulate_gpus, settings.machine_id)
    try:
        return nvml_gpus()
    except NoGpuError as exc:
        raise NoGpuError(
            f"{exc}. The daemon needs NVIDIA GPUs; on a machine without them run it with "
            "--simulate-gpus COUNTxMODEL (e.g. --simulate-gpus 2xA100-80GB) for development "
            f"and tests. Known models: {', '.join(SIMULATED_MODELS)}"
        ) from exc
