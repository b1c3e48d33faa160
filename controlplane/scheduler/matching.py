"""Pure placement logic over an in-memory snapshot of free capacity (no I/O)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gpuplane.v1 import types_pb2

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
    free: list[FreeGpu] = field(default_factory=list)
    # Healthy GPUs of the host, free or not.
    total_gpus: int = 0
    reliability_permille: int = 1000


def _cc(value: str) -> tuple[int, int]:
    major, _, minor = value.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return 0, 0


def gpu_fits(spec: types_pb2.JobSpec, gpu: FreeGpu) -> bool:
    if spec.gpu_models:
        name = gpu.name.lower()
        if not any(model.strip().lower() in name for model in spec.gpu_models):
            return False
    if spec.min_vram_gib and gpu.memory_total_bytes < spec.min_vram_gib * GIB:
        return False
    return not (
        spec.min_compute_capability
        and _cc(gpu.compute_capability) < _cc(spec.min_compute_capability)
    )


def host_rejection(
    spec: types_pb2.JobSpec, host: HostCapacity, allow_simulated: bool
) -> str | None:
    """Why a host can never take this job regardless of load, or None when it could."""
    if host.simulated and not allow_simulated:
        return "simulated"
    if host.host_id in spec.exclude_host_ids:
        return "excluded"
    if spec.locations and host.location not in spec.locations:
        return "location"
    for key, value in spec.host_labels.items():
        if host.labels.get(key) != value:
            return "labels"
    limit = spec.max_price_per_gpu_hour_micro_credits
    if limit and host.price_per_gpu_hour > limit:
        return "price"
    return None


@dataclass(slots=True)
class Placement:
    host: HostCapacity
    gpus: list[FreeGpu]


@dataclass(slots=True)
class Decision:
    placement: Placement | None
    # Why not, for "why pending": counts of hosts by the first reason they failed.
    reasons: Counter[str]
    hosts_considered: int


def first_fit(
    spec: types_pb2.JobSpec, hosts: list[HostCapacity], allow_simulated: bool
) -> Decision:
    """The cheapest host (then lowest id) with enough free GPUs that fit; GPUs in index order."""
    reasons: Counter[str] = Counter()
    for host in hosts:
        rejection = host_rejection(spec, host, allow_simulated)
        if rejection is not None:
            reasons[rejection] += 1
            continue
        fitting = [g for g in host.free if gpu_fits(spec, g)]
        if len(fitting) < spec.gpu_count:
            reasons["busy" if host.total_gpus >= spec.gpu_count else "too_small"] += 1
            continue
        return Decision(Placement(host, fitting[: spec.gpu_count]), reasons, len(hosts))
    return Decision(None, reasons, len(hosts))


REASON_TEXT = {
    "simulated": "have simulated GPUs (set allow_simulated)",
    "excluded": "are excluded",
    "location": "are in other locations",
    "labels": "lack the required host labels",
    "price": "exceed max_price_per_gpu_hour",
    "busy": "lack enough free matching GPUs right now",
    "too_small": "have too few GPUs",
}


def explain(spec: types_pb2.JobSpec, decision: Decision) -> str:
    """e.g. "0 of 12 hosts have 2 free matching GPUs; 3 exceed max_price_per_gpu_hour"."""
    wanted = f"{spec.gpu_count} free matching GPU{'s' if spec.gpu_count != 1 else ''}"
    head = f"0 of {decision.hosts_considered} online hosts have {wanted}"
    details = [
        f"{count} {REASON_TEXT.get(reason, reason)}"
        for reason, count in decision.reasons.most_common()
    ]
    return head + ("; " + "; ".join(details) if details else "")
