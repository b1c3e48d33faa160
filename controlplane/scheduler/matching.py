"""The per-host capacity snapshot that offers are listed from (no I/O); placement decisions
run on scheduler/index.py."""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30


@dataclass(slots=True)
class FreeGpu:
    uuid: str
    name: str
    memory_total_bytes: int
    compute_capability: str


@dataclass(slots=True)
class HostCapacity:
    host_id: str
    price_per_gpu_hour: int
    location: str
    labels: dict[str, str]
    simulated: bool
    # Passed its hardware verification probe (controlplane/verification).
    verified: bool = False
    free: list[FreeGpu] = field(default_factory=list)
    # Healthy GPUs of the host, free or not.
    total_gpus: int = 0
    reliability_permille: int = 1000
