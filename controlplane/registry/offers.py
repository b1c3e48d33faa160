"""Offers: free healthy GPUs of online hosts, grouped by host and model, filtered and ordered
cheapest first, then most reliable. Pure functions over the scheduler's capacity snapshot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from controlplane.errors import InvalidArgument
from controlplane.scheduler.matching import GIB, FreeGpu, HostCapacity


@dataclass(frozen=True)
class OfferFilter:
    """What a buyer asks for; zero values (and empty strings) mean no constraint."""

    # Case-insensitive substring of the GPU model name.
    gpu_type: str = ""
    min_vram_gib: int = 0
    max_price_per_gpu_hour: int = 0
    min_gpu_count: int = 0
    # Case-insensitive exact location.
    location: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exclude_simulated: bool = False
    verified_only: bool = False

    def validate(self) -> None:
        if self.max_price_per_gpu_hour < 0:
            raise InvalidArgument("max_price_per_gpu_hour_micro_credits", "must not be negative")
        if len(self.gpu_type) > 200:
            raise InvalidArgument("gpu_type", "at most 200 characters")
        if len(self.location) > 100:
            raise InvalidArgument("location", "at most 100 characters")
        if len(self.labels) > 64:
            raise InvalidArgument("labels", "at most 64 labels")

    def admits_host(self, host: HostCapacity) -> bool:
        if self.exclude_simulated and host.simulated:
            return False
        if self.verified_only and not host.verified:
            return False
        if self.location and host.location.lower() != self.location.lower():
            return False
        if self.max_price_per_gpu_hour and host.price_per_gpu_hour > self.max_price_per_gpu_hour:
            return False
        return all(host.labels.get(k) == v for k, v in self.labels.items())


@dataclass(frozen=True)
class Offer:
    host_id: str
    gpu_model: str
    vram_gib: int
    free_gpu_count: int
    total_gpu_count: int
    price_per_gpu_hour: int
    location: str
    labels: dict[str, str]
    reliability_permille: int
    simulated: bool
    compute_capability: str
    verified: bool = False


def _groups(free: Sequence[FreeGpu]) -> dict[tuple[str, int, str], list[FreeGpu]]:
    """Free GPUs by (model, VRAM in GiB, compute capability)."""
    groups: dict[tuple[str, int, str], list[FreeGpu]] = {}
    for gpu in free:
        key = (gpu.name, gpu.memory_total_bytes // GIB, gpu.compute_capability)
        groups.setdefault(key, []).append(gpu)
    return groups


def build_offers(hosts: Sequence[HostCapacity], wanted: OfferFilter) -> list[Offer]:
    """Every offer that passes `wanted`: cheapest first, then most reliable, then by host and
    model so that pages are stable."""
    gpu_type = wanted.gpu_type.strip().lower()
    offers: list[Offer] = []
    for host in hosts:
        if not host.free or not wanted.admits_host(host):
            continue
        for (model, vram, capability), free in _groups(host.free).items():
            if gpu_type and gpu_type not in model.lower():
                continue
            if vram < wanted.min_vram_gib or len(free) < wanted.min_gpu_count:
                continue
            offers.append(
                Offer(
                    host_id=host.host_id,
                    gpu_model=model,
                    vram_gib=vram,
                    free_gpu_count=len(free),
                    total_gpu_count=host.total_gpus,
                    price_per_gpu_hour=host.price_per_gpu_hour,
                    location=host.location,
                    labels=host.labels,
                    reliability_permille=host.reliability_permille,
                    simulated=host.simulated,
                    compute_capability=capability,
                    verified=host.verified,
                )
            )
    offers.sort(
        key=lambda o: (o.price_per_gpu_hour, -o.reliability_permille, o.host_id, o.gpu_model)
    )
    return offers
