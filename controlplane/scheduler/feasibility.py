"""Whether any registered host could ever run a job, whatever its load : the test
behind REJECTED, and behind retrying on another host only while another could take it.

"Could ever" counts every registered, non-revoked host in any state (a lost host may come
back, a draining one be undrained) with all its GPUs, healthy or not, as if idle, and checks
what the spec fixes against what the host is: simulated GPUs, excluded hosts, location,
host labels, GPU model, VRAM, compute capability and count. Price is not counted: providers
change prices, so a job waiting for a cheaper GPU waits (until its hold expires). A retry
avoids the hosts that lost it only while another host could run it at its current price."""

from __future__ import annotations

from collections import Counter

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.scheduler.capacity import load_registered
from controlplane.scheduler.demand import Demand
from controlplane.scheduler.explain import ORDER, REASON_TEXT, wanted
from controlplane.scheduler.index import CapacityIndex, HostEntry, host_rejection, within_price


def never_reason(
    index: CapacityIndex, demand: Demand, host: HostEntry, priced: bool = False
) -> str:
    """The first reason `host` could never take the job, idle ("" when it could); with
    `priced`, a host over the job's max price at its current price cannot either."""
    rejection = host_rejection(demand, host)
    if rejection is not None:
        return rejection
    if demand.gpu_count:
        totals = [host.total(c.id) for c in index.fitting_classes(demand)]
        if not any(totals):
            return "no_match"
        if max(totals) < demand.gpu_count:
            return "too_small"
    return "price" if priced and not within_price(demand, host) else ""


def could_run(index: CapacityIndex, demand: Demand, priced: bool = False) -> bool:
    """Whether some host of `index` could take the job if it were idle."""
    return any(not never_reason(index, demand, h, priced) for h in index.hosts.values())


def why_never(index: CapacityIndex, demand: Demand) -> str:
    """Why no registered host could ever run the job, counting hosts by the first reason,
    e.g. "no registered host could ever run 1×B300: 3 have no GPU of an allowed model/VRAM/
    compute capability"."""
    reasons = Counter(never_reason(index, demand, h) for h in index.hosts.values())
    reasons.pop("", None)  # hosts that could (none, when this is asked)
    head = f"no registered host could ever run {wanted(demand)}"
    if not reasons:
        return f"{head}: no hosts are registered"
    details = [
        f"{count} {REASON_TEXT[reason][0 if count == 1 else 1]}"
        for reason, count in sorted(reasons.items(), key=lambda rc: (-rc[1], ORDER[rc[0]]))
    ]
    return f"{head}: " + "; ".join(details)


class Feasibility:
    """One cycle's answers: online hosts first (loaded already; most jobs that can run match
    one), then every registered host, loaded only when a job matches no online host. Each
    answer is kept by the demand's shape, so a cycle asks once per shape."""

    def __init__(self, session: AsyncSession, online: CapacityIndex) -> None:
        self.session = session
        self.online = online
        self.registered: CapacityIndex | None = None
        self._answers: dict[tuple[object, ...], bool] = {}

    async def ever(self, demand: Demand, priced: bool = False) -> bool:
        """Whether some registered host could ever run the job (with `priced`: at its
        current price)."""
        shape = (*_shape(demand), demand.max_price if priced else None)
        answer = self._answers.get(shape)
        if answer is None:
            answer = could_run(self.online, demand, priced) or could_run(
                await self._all(), demand, priced
            )
            self._answers[shape] = answer
        return answer

    async def why_never(self, demand: Demand) -> str:
        return why_never(await self._all(), demand)

    async def _all(self) -> CapacityIndex:
        if self.registered is None:
            self.registered = await load_registered(self.session)
        return self.registered


def _shape(demand: Demand) -> tuple[object, ...]:
    """What feasibility depends on: the placement signature less the price."""
    return (
        demand.gpu_count,
        demand.gpu_key,
        demand.locations,
        demand.host_labels,
        demand.exclude,
        demand.allow_simulated,
        demand.allow_unverified,
    )
