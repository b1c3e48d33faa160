"""Quotes for dry-run submits: matching offers, price range, hold, estimated start, decided on
the same capacity index and policies as the scheduler."""

from __future__ import annotations

from gpuplane.v1 import jobs_pb2, types_pb2

from controlplane.db.base import utcnow
from controlplane.jobs.policy import hold_for, priced
from controlplane.ledger.service import format_credits
from controlplane.scheduler.demand import GIB, Demand, Policy, demand_of
from controlplane.scheduler.explain import explain
from controlplane.scheduler.index import CapacityIndex, could_take
from controlplane.scheduler.market import Market
from controlplane.scheduler.planner import earliest_start
from controlplane.scheduler.policies import choose

MAX_QUOTE_OFFERS = 20


class Quoter:
    def __init__(
        self,
        market: Market,
        default_max_price: int,
        default_policy: int = Policy.PLACEMENT_POLICY_CHEAPEST,
    ) -> None:
        self.market = market
        self.default_max_price = default_max_price
        self.default_policy = default_policy

    async def quote(self, spec: types_pb2.JobSpec) -> jobs_pb2.Quote:
        """The quote of a prepared spec; its hold is priced as submit prices it (the dearest
        matching offer), on a view loaded after this replica's last change of GPUs and at
        most a few seconds old (Market.quote_view): a quote reads the database only then,
        so its cost does not grow with the fleet while GPUs stay as they are."""
        view = await self.market.quote_view()
        index = view.index
        now = utcnow()
        demand = demand_of("", "", spec, now.timestamp(), default_policy=self.default_policy)
        spec = priced(spec, view.dearest_match(demand), self.default_max_price)
        offers, prices = _offers(index, demand)
        quote = jobs_pb2.Quote(
            offers=offers,
            matching_host_count=len(prices),
            min_price_per_gpu_hour_micro_credits=min(prices, default=0),
            max_price_per_gpu_hour_micro_credits=max(prices, default=0),
            hold_micro_credits=hold_for(spec, self.default_max_price),
            hold_price_per_gpu_hour_micro_credits=(
                0 if spec.budget_micro_credits else spec.max_price_per_gpu_hour_micro_credits
            ),
        )
        choice = choose(index, demand, lambda _: True)
        if choice is not None:
            host = choice[0]
            quote.estimated_start.FromDatetime(now)
            quote.explanation = (
                f"can start now on {host.host_id} at {format_credits(host.price)} credits per "
                "GPU-hour"
            )
            return quote
        quote.explanation = explain(index, demand, lambda _: True)
        soonest = earliest_start(index, demand, now.timestamp())
        if soonest is not None:
            quote.estimated_start.FromSeconds(int(soonest.start))
            quote.explanation += (
                f"; earliest start on {soonest.host_id} when its running jobs reach their "
                "max_duration, unless queued jobs take it first"
            )
        return quote


def _offers(index: CapacityIndex, demand: Demand) -> tuple[list[types_pb2.Offer], list[int]]:
    """The free offers that fit the job now (at most MAX_QUOTE_OFFERS, cheapest first) and the
    prices of every host that could take it, free or busy."""
    classes = index.fitting_classes(demand)
    offers: list[types_pb2.Offer] = []
    prices: list[int] = []
    for host in sorted(index.hosts.values(), key=lambda h: (h.price, h.host_id)):
        if not could_take(classes, demand, host):
            continue
        sizes = [(len(host.free.get(c.id, ())), host.total(c.id), c) for c in classes]
        prices.append(host.price)
        for free, total, gpu_class in sizes:
            if free >= max(demand.gpu_count, 1) and len(offers) < MAX_QUOTE_OFFERS:
                offers.append(
                    types_pb2.Offer(
                        host_id=host.host_id,
                        gpu_model=gpu_class.name,
                        vram_gib=gpu_class.memory_total_bytes // GIB,
                        free_gpu_count=free,
                        total_gpu_count=total,
                        price_per_gpu_hour_micro_credits=host.price,
                        location=host.location,
                        labels=host.labels,
                        simulated=host.simulated,
                        verified=host.verified,
                        compute_capability=gpu_class.compute_capability,
                        reliability_permille=host.reliability_permille,
                    )
                )
    return offers, prices
