"""The in-memory index of free GPU capacity that placement decisions run on (no I/O).

GPUs are grouped into classes (same NVML name, VRAM and compute capability). For each class
and each free count k, a list of the hosts with exactly k free GPUs of that class is kept
sorted by (price, host id), so a decision looks only at buckets that can fit the job, in
price order, instead of scanning every host."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from controlplane.scheduler.demand import Demand, parse_cc


@dataclass(frozen=True, slots=True)
class GpuClass:
    id: int
    name: str
    memory_total_bytes: int
    compute_capability: str
    name_lower: str
    cc: tuple[int, int]

    def fits(self, demand: Demand) -> bool:
        if demand.gpu_models and not any(m in self.name_lower for m in demand.gpu_models):
            return False
        if self.memory_total_bytes < demand.min_vram_bytes:
            return False
        return self.cc >= demand.min_cc


@dataclass(slots=True)
class HostEntry:
    host_id: str
    price: int
    location: str
    labels: dict[str, str]
    simulated: bool
    reliability_permille: int = 1000
    # Passed its hardware verification probe (controlplane/verification).
    verified: bool = False
    # Registered with a self-minted token: unverified, it takes no job, whatever the job allows.
    self_service: bool = False
    # Free GPU uuids by class id, in GPU index order.
    free: dict[int, list[str]] = field(default_factory=dict)
    # Expected end (seconds since the epoch) of each busy healthy GPU, by class id.
    busy_until: dict[int, list[float]] = field(default_factory=dict)

    # GPU counts over all classes, kept by CapacityIndex (add_host and take).
    total_gpus: int = 0
    free_gpus: int = 0

    def total(self, class_id: int) -> int:
        return len(self.free.get(class_id, ())) + len(self.busy_until.get(class_id, ()))

    def count(self) -> None:
        self.free_gpus = sum(len(v) for v in self.free.values())
        self.total_gpus = self.free_gpus + sum(len(v) for v in self.busy_until.values())


def host_rejection(demand: Demand, host: HostEntry) -> str | None:
    """Why the host can never take this job whatever its load (GPU fit aside), or None."""
    if host.simulated and not demand.allow_simulated:
        return "simulated"
    if not host.verified and (host.self_service or not demand.allow_unverified):
        return "unverified"
    if host.host_id in demand.exclude:
        return "excluded"
    if demand.locations and host.location not in demand.locations:
        return "location"
    for key, value in demand.host_labels:
        if host.labels.get(key) != value:
            return "labels"
    if host.reliability_permille < demand.min_reliability:
        return "reliability"
    return None


def within_price(demand: Demand, host: HostEntry) -> bool:
    return not demand.max_price or host.price <= demand.max_price


def could_take(classes: tuple[GpuClass, ...], demand: Demand, host: HostEntry) -> bool:
    """Whether the host matches the job whatever its load: host constraints, max price, and
    enough GPUs in all of one class in `classes` (those fitting the job)."""
    if host_rejection(demand, host) is not None or not within_price(demand, host):
        return False
    return not demand.gpu_count or any(host.total(c.id) >= demand.gpu_count for c in classes)


class CapacityIndex:
    def __init__(self) -> None:
        self.classes: dict[tuple[str, int, str], GpuClass] = {}
        self.hosts: dict[str, HostEntry] = {}
        # class id → free count → sorted [(price, host id)]
        self.buckets: dict[int, dict[int, list[tuple[int, str]]]] = {}
        self._fitting: dict[tuple[object, ...], tuple[GpuClass, ...]] = {}
        # Free GPUs over all hosts (a cycle stops trying GPU jobs when it reaches 0).
        self.free_total = 0

    # ---- building ------------------------------------------------------------------------

    def gpu_class(self, name: str, memory_total_bytes: int, compute_capability: str) -> GpuClass:
        key = (name, memory_total_bytes, compute_capability)
        found = self.classes.get(key)
        if found is None:
            found = GpuClass(
                len(self.classes),
                name,
                memory_total_bytes,
                compute_capability,
                name.lower(),
                parse_cc(compute_capability),
            )
            self.classes[key] = found
            self._fitting.clear()
        return found

    def add_host(self, host: HostEntry) -> None:
        """Adds a host whose free/busy GPUs are filled in (replacing one of the same id)."""
        if host.host_id in self.hosts:
            self.remove_host(host.host_id)
        self.hosts[host.host_id] = host
        host.count()
        for class_id, uuids in host.free.items():
            if uuids:
                self._bucket_add(class_id, len(uuids), host)
                self.free_total += len(uuids)

    def remove_host(self, host_id: str) -> None:
        host = self.hosts.pop(host_id)
        for class_id, uuids in host.free.items():
            if uuids:
                self._bucket_remove(class_id, len(uuids), host)
                self.free_total -= len(uuids)

    def _bucket_add(self, class_id: int, count: int, host: HostEntry) -> None:
        bucket = self.buckets.setdefault(class_id, {}).setdefault(count, [])
        bisect.insort(bucket, (host.price, host.host_id))

    def _bucket_remove(self, class_id: int, count: int, host: HostEntry) -> None:
        bucket = self.buckets[class_id][count]
        entry = (host.price, host.host_id)
        position = bisect.bisect_left(bucket, entry)
        if position == len(bucket) or bucket[position] != entry:
            raise KeyError(f"host {host.host_id} not in bucket {class_id}/{count}")
        del bucket[position]

    # ---- changing --------------------------------------------------------------------------

    def take(self, host_id: str, class_id: int, count: int, until: float) -> list[str]:
        """Allocates `count` free GPUs of the class on the host (lowest index first); they
        stay busy until `until` for reservation estimates."""
        host = self.hosts[host_id]
        free = host.free[class_id]
        if len(free) < count:
            raise ValueError(f"host {host_id} has {len(free)} free GPUs of class {class_id}")
        self._bucket_remove(class_id, len(free), host)
        taken, host.free[class_id] = free[:count], free[count:]
        if host.free[class_id]:
            self._bucket_add(class_id, len(host.free[class_id]), host)
        host.busy_until.setdefault(class_id, []).extend([until] * count)
        self.free_total -= count
        host.free_gpus -= count
        return taken

    # ---- queries ---------------------------------------------------------------------------

    def fitting_classes(self, demand: Demand) -> tuple[GpuClass, ...]:
        key = demand.gpu_key
        found = self._fitting.get(key)
        if found is None:
            found = tuple(c for c in self.classes.values() if c.fits(demand))
            self._fitting[key] = found
        return found

    def candidates(
        self, demand: Demand, class_id: int, count: int
    ) -> Iterator[tuple[int, HostEntry]]:
        """Hosts with exactly `count` free GPUs of the class that pass the job's host
        constraints, cheapest first; stops past the job's max price."""
        bucket = self.buckets.get(class_id, {}).get(count)
        if not bucket:
            return
        for price, host_id in bucket:
            if demand.max_price and price > demand.max_price:
                return
            host = self.hosts[host_id]
            if host_rejection(demand, host) is None:
                yield price, host

    def max_free(self, class_id: int) -> int:
        counts = [k for k, hosts in self.buckets.get(class_id, {}).items() if hosts]
        return max(counts, default=0)
