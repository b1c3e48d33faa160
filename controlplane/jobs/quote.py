"""Quotes for dry-run submits: matching offers, price range, hold, estimated start."""

from __future__ import annotations

from gpuplane.v1 import jobs_pb2, types_pb2

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.jobs.service import hold_for
from controlplane.scheduler.matching import GIB, explain, first_fit, gpu_fits, host_rejection
from controlplane.scheduler.service import capacity_snapshot

MAX_QUOTE_OFFERS = 20


class Quoter:
    def __init__(self, db: Database, default_max_price: int) -> None:
        self.db = db
        self.default_max_price = default_max_price

    async def quote(self, spec: types_pb2.JobSpec) -> jobs_pb2.Quote:
        async with self.db.read() as session:
            hosts = await capacity_snapshot(session)
        offers: list[types_pb2.Offer] = []
        prices: list[int] = []
        for host in hosts:
            if host_rejection(spec, host, spec.allow_simulated) is not None:
                continue
            fitting = [g for g in host.free if gpu_fits(spec, g)]
            if host.total_gpus < spec.gpu_count:
                continue
            prices.append(host.price_per_gpu_hour)
            if len(fitting) >= max(spec.gpu_count, 1) and len(offers) < MAX_QUOTE_OFFERS:
                first = fitting[0]
                offers.append(
                    types_pb2.Offer(
                        host_id=host.host_id,
                        gpu_model=first.name,
                        vram_gib=first.memory_total_bytes // GIB,
                        free_gpu_count=len(fitting),
                        total_gpu_count=host.total_gpus,
                        price_per_gpu_hour_micro_credits=host.price_per_gpu_hour,
                        location=host.location,
                        labels=host.labels,
                        simulated=host.simulated,
                        compute_capability=first.compute_capability,
                    )
                )
        decision = first_fit(spec, hosts, spec.allow_simulated)
        quote = jobs_pb2.Quote(
            offers=offers,
            matching_host_count=len(prices),
            min_price_per_gpu_hour_micro_credits=min(prices, default=0),
            max_price_per_gpu_hour_micro_credits=max(prices, default=0),
            hold_micro_credits=hold_for(spec, self.default_max_price),
        )
        if decision.placement is not None:
            quote.estimated_start.FromDatetime(utcnow())
            host = decision.placement.host
            quote.explanation = (
                f"can start now on {host.host_id} at {host.price_per_gpu_hour} "
                "micro-credits per GPU-hour"
            )
        else:
            quote.explanation = explain(spec, decision)
        return quote
