"""What a job's hold is and how long it lasts, and the jobs domain's policy settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuplane.v1 import types_pb2

from controlplane.ledger import service as ledger


@dataclass(frozen=True, slots=True)
class JobPolicy:
    fee_basis_points: int
    # Price used for the hold when the job names no max price (the policy's ceiling).
    default_max_price: int
    allow_simulated_by_default: bool
    retry_backoff: timedelta = timedelta(seconds=1)
    # A placed attempt whose daemon has not reported within this is lost.
    dispatch_ack_timeout: timedelta = timedelta(minutes=2)
    # How long a job may wait for placement before its hold expires; the hold lasts this
    # plus max_duration from submit (and again from each requeue).
    hold_queue_timeout: timedelta = timedelta(days=1)


def hold_expiry(spec: types_pb2.JobSpec, policy: JobPolicy, now: datetime) -> datetime:
    """When a hold placed (or requeued) at `now` expires if the job has no outcome by then."""
    return now + policy.hold_queue_timeout + timedelta(seconds=spec.max_duration_seconds)


def hold_for(spec: types_pb2.JobSpec, default_max_price: int) -> int:
    """The budget, or the most the job could cost: price × GPUs × max duration."""
    if spec.budget_micro_credits:
        return spec.budget_micro_credits
    price = spec.max_price_per_gpu_hour_micro_credits or default_max_price
    return ledger.charge_for(price, spec.gpu_count, spec.max_duration_seconds * 1000)
