"""What a job's hold is and how long it lasts, and the jobs domain's policy settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from gpuplane.v1 import types_pb2

from controlplane.ledger import service as ledger


@dataclass(frozen=True, slots=True)
class JobPolicy:
    fee_basis_points: int
    # Price a hold assumes when no offer matches the job and it names no max price (the
    # policy's ceiling on host prices).
    default_max_price: int
    allow_simulated_by_default: bool
    # Dev and test stacks: jobs may run on hosts not verified (GPUPLANE_ALLOW_UNVERIFIED_...).
    allow_unverified_by_default: bool = False
    retry_backoff: timedelta = timedelta(seconds=1)
    # A placed attempt whose daemon has not reported within this is lost.
    dispatch_ack_timeout: timedelta = timedelta(minutes=2)
    # How long a job may wait for placement before its hold expires; the hold lasts this
    # plus max_duration from submit (and again from each requeue).
    hold_queue_timeout: timedelta = timedelta(days=1)
    # The control plane stops a running attempt this long after its budget's run time (from
    # when it saw it start) if its daemon has not, and asks again every `budget_stop_resend`.
    budget_stop_grace: timedelta = timedelta(seconds=2)
    budget_stop_resend: timedelta = timedelta(seconds=5)
    # Reports not signed by their host's key are refused (jobs/signatures.py).
    require_signed_reports: bool = True
    # What a report's run time may exceed the control plane's own observation by (the
    # RUNNING report's delivery latency; jobs/clock.py).
    run_time_slack: timedelta = timedelta(seconds=5)
    # How often heartbeats' running lists are compared with live attempts (jobs/reconcile.py).
    reconcile_interval: timedelta = timedelta(seconds=5)


def hold_expiry(spec: types_pb2.JobSpec, policy: JobPolicy, now: datetime) -> datetime:
    """When a hold placed (or requeued) at `now` expires if the job has no outcome by then."""
    return now + policy.hold_queue_timeout + timedelta(seconds=spec.max_duration_seconds)


class MarketPrices(Protocol):
    """The market a hold is priced on (the scheduler's Market, on its capacity index)."""

    async def dearest_match(self, spec: types_pb2.JobSpec) -> int | None:
        """The highest price per GPU-hour among the offers matching `spec` now, or None."""
        ...


def hold_price(spec: types_pb2.JobSpec, dearest_match: int | None, ceiling: int) -> int:
    """The price per GPU-hour a job's hold assumes: the dearest offer matching it now (which
    is within its max price), else its max price, else the policy's ceiling."""
    if dearest_match is not None:
        return dearest_match
    return spec.max_price_per_gpu_hour_micro_credits or ceiling


def priced(spec: types_pb2.JobSpec, dearest_match: int | None, ceiling: int) -> types_pb2.JobSpec:
    """The spec with the price its hold assumes as its max price, so that no attempt is ever
    placed on a dearer host and charges never exceed the hold. A budget is a hold of its
    own (metering stops the job when it is spent): such a spec is returned unchanged."""
    if spec.budget_micro_credits:
        return spec
    capped = types_pb2.JobSpec()
    capped.CopyFrom(spec)
    capped.max_price_per_gpu_hour_micro_credits = hold_price(spec, dearest_match, ceiling)
    return capped


def hold_for(spec: types_pb2.JobSpec, default_max_price: int) -> int:
    """The budget, or the most the job could cost: price × GPUs × max duration (the price is
    the spec's max price once `priced`)."""
    if spec.budget_micro_credits:
        return spec.budget_micro_credits
    price = spec.max_price_per_gpu_hour_micro_credits or default_max_price
    return ledger.charge_for(price, spec.gpu_count, spec.max_duration_seconds * 1000)
