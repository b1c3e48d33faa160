"""SubmitJob with dry_run: the spec checked and completed exactly as a submit would, then
quoted with the caller's available credit; nothing is stored and no credit is held."""

from __future__ import annotations

from typing import Protocol

from gpuplane.v1 import jobs_pb2, types_pb2

from controlplane.auth.principal import Principal
from controlplane.jobs.service import JobService, limit_refusal
from controlplane.ledger.service import format_credits


class Quotes(Protocol):
    """Prices a prepared spec on the scheduler's capacity index (the scheduler's Quoter)."""

    async def quote(self, spec: types_pb2.JobSpec) -> jobs_pb2.Quote: ...


class DryRun:
    def __init__(self, jobs: JobService, quoter: Quotes) -> None:
        self.jobs = jobs
        self.quoter = quoter

    async def quote(self, caller: Principal, spec: types_pb2.JobSpec) -> jobs_pb2.Quote:
        """The quote of `spec` after the validation and defaults a submit applies, with the
        caller's available credit and what its monthly spending limit leaves, and why submit
        would be refused when either is short."""
        quote = await self.quoter.quote(self.jobs.prepare_spec(spec))
        balance = await self.jobs.ledger.balance(caller.tenant_id)
        quote.available_micro_credits = balance.available
        if quote.hold_micro_credits > balance.available:
            quote.credit_shortfall = (
                f"insufficient credit: the hold of {format_credits(quote.hold_micro_credits)} "
                f"credits exceeds the {format_credits(balance.available)} credits available; "
                "deposit more or set a lower spec.budget_micro_credits, "
                "spec.max_duration_seconds or spec.max_price_per_gpu_hour_micro_credits"
            )
        budget = await self.jobs.ledger.budget(caller.tenant_id)
        if budget.monthly_limit:
            quote.spending_limit_micro_credits = budget.monthly_limit
            quote.spending_limit_remaining_micro_credits = budget.remaining
            if quote.hold_micro_credits > budget.remaining:
                quote.spending_limit_shortfall = limit_refusal(budget, quote.hold_micro_credits)
        return quote
