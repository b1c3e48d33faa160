""" "Why pending": counts every online host by the first reason it cannot take the job now,
e.g. "0 of 812 online hosts have 8×H100 free; 3 would fit but exceed
max_price_per_gpu_hour; 809 lack enough free matching GPUs right now" (no I/O)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from controlplane.scheduler.demand import Demand
from controlplane.scheduler.index import CapacityIndex, HostEntry, host_rejection

# reason → (singular, plural) text after the host count, in the order they are tested.
REASON_TEXT: Mapping[str, tuple[str, str]] = {
    "simulated": (
        "has simulated GPUs (set allow_simulated)",
        "have simulated GPUs (set allow_simulated)",
    ),
    "unverified": (
        "has not passed hardware verification (set allow_unverified)",
        "have not passed hardware verification (set allow_unverified)",
    ),
    "excluded": ("is excluded", "are excluded"),
    "location": ("is in another location", "are in other locations"),
    "labels": ("lacks the required host labels", "lack the required host labels"),
    "reliability": (
        "is less reliable than min_reliability",
        "are less reliable than min_reliability",
    ),
    "no_match": (
        "has no GPU of an allowed model/VRAM/compute capability",
        "have no GPU of an allowed model/VRAM/compute capability",
    ),
    "too_small": ("has too few matching GPUs", "have too few matching GPUs"),
    "price": (
        "would fit but exceeds max_price_per_gpu_hour",
        "would fit but exceed max_price_per_gpu_hour",
    ),
    "reserved": (
        "is reserved for a job that has waited longer",
        "are reserved for jobs that have waited longer",
    ),
    "busy": (
        "lacks enough free matching GPUs right now",
        "lack enough free matching GPUs right now",
    ),
}
ORDER = {reason: n for n, reason in enumerate(REASON_TEXT)}


def wanted(demand: Demand) -> str:
    what = "/".join(m.upper() for m in demand.gpu_models) if demand.gpu_models else "GPU"
    return f"{demand.gpu_count}×{what}"


def host_reason(
    index: CapacityIndex, demand: Demand, host: HostEntry, usable: Callable[[HostEntry], bool]
) -> str:
    """The first reason `host` cannot take the job now ("" when it could)."""
    rejection = host_rejection(demand, host)
    if rejection is not None:
        return rejection
    classes = index.fitting_classes(demand)
    if demand.gpu_count:
        totals = [host.total(c.id) for c in classes]
        if not any(totals):
            return "no_match"
        if max(totals) < demand.gpu_count:
            return "too_small"
    if demand.max_price and host.price > demand.max_price:
        return "price"
    free = max((len(host.free.get(c.id, ())) for c in classes), default=0)
    if demand.gpu_count and free < demand.gpu_count:
        return "busy"
    return "" if usable(host) else "reserved"


def explain(index: CapacityIndex, demand: Demand, usable: Callable[[HostEntry], bool]) -> str:
    reasons: Counter[str] = Counter()
    for host in index.hosts.values():
        reason = host_reason(index, demand, host, usable)
        reasons[reason or "busy"] += 1  # "" only races with this cycle's own placements
    total = len(index.hosts)
    if total == 0:
        return "no online hosts"
    head = f"0 of {total} online hosts have {wanted(demand)} free"
    details = [
        f"{count} {REASON_TEXT[reason][0 if count == 1 else 1]}"
        for reason, count in sorted(reasons.items(), key=lambda rc: (-rc[1], ORDER[rc[0]]))
    ]
    return "; ".join([head, *details])
