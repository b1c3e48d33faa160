"""Placement policies: among the hosts that fit a job, which one it gets (no I/O).

- cheapest: the lowest price per GPU-hour (then host id).
- balanced: the lowest effective price: price ÷ reliability × (1 + half the host's load),
  so a cheap host that loses attempts or is already busy loses to a slightly dearer one.
- pack: the host with the fewest free GPUs that still fit (then cheapest), keeping whole
  hosts free for large jobs.
- spread: the host with the most free GPUs (then cheapest)."""

from __future__ import annotations

from collections.abc import Callable

from controlplane.scheduler.demand import Demand, Policy
from controlplane.scheduler.index import (
    CapacityIndex,
    GpuClass,
    HostEntry,
    host_rejection,
    within_price,
)

# Hosts a balanced decision scores per (class, free count) bucket, cheapest first.
BALANCED_CANDIDATES = 16

Usable = Callable[[HostEntry], bool]
Choice = tuple[HostEntry, GpuClass | None]


def choose(index: CapacityIndex, demand: Demand, usable: Usable) -> Choice | None:
    """The host (and GPU class) the job gets now under its policy, or None."""
    if demand.gpu_count == 0:
        return _cpu_only(index, demand, usable)
    classes = index.fitting_classes(demand)
    if demand.policy == Policy.PLACEMENT_POLICY_BALANCED:
        return _balanced(index, demand, classes, usable)
    counts = range(demand.gpu_count, 1 + max((index.max_free(c.id) for c in classes), default=0))
    if demand.policy == Policy.PLACEMENT_POLICY_SPREAD:
        counts = counts[::-1]
    if demand.policy in (Policy.PLACEMENT_POLICY_PACK, Policy.PLACEMENT_POLICY_SPREAD):
        for count in counts:
            best = _cheapest_at(index, demand, classes, [count], usable)
            if best is not None:
                return best
        return None
    return _cheapest_at(index, demand, classes, counts, usable)


def _cheapest_at(
    index: CapacityIndex,
    demand: Demand,
    classes: tuple[GpuClass, ...],
    counts: range | list[int],
    usable: Usable,
) -> Choice | None:
    best: tuple[int, str] | None = None
    choice: Choice | None = None
    for gpu_class in classes:
        for count in counts:
            for price, host in index.candidates(demand, gpu_class.id, count):
                if best is not None and (price, host.host_id) >= best:
                    break  # the bucket is in price order: nothing cheaper follows
                if usable(host):
                    best, choice = (price, host.host_id), (host, gpu_class)
                    break
    return choice


def effective_price(host: HostEntry) -> float:
    """Price adjusted for reliability and load (balanced policy; lower is better)."""
    total = host.total_gpus
    load = (total - host.free_gpus) / total if total else 0.0
    return host.price * 1000 / max(host.reliability_permille, 1) * (1 + 0.5 * load)


def _balanced(
    index: CapacityIndex, demand: Demand, classes: tuple[GpuClass, ...], usable: Usable
) -> Choice | None:
    best: tuple[float, int, str] | None = None
    choice: Choice | None = None
    for gpu_class in classes:
        for count in range(demand.gpu_count, 1 + index.max_free(gpu_class.id)):
            seen = 0
            for price, host in index.candidates(demand, gpu_class.id, count):
                if not usable(host):
                    continue
                key = (effective_price(host), price, host.host_id)
                if best is None or key < best:
                    best, choice = key, (host, gpu_class)
                seen += 1
                if seen == BALANCED_CANDIDATES:
                    break
    return choice


def _cpu_only(index: CapacityIndex, demand: Demand, usable: Usable) -> Choice | None:
    """A job asking no GPU runs on the cheapest host that passes its host constraints."""
    fitting = [
        h
        for h in index.hosts.values()
        if host_rejection(demand, h) is None and within_price(demand, h) and usable(h)
    ]
    if not fitting:
        return None
    return min(fitting, key=lambda h: (h.price, h.host_id)), None
