"""The job lifecycle's policy, built from its settings group."""

from __future__ import annotations

from datetime import timedelta

from controlplane.jobs.service import JobPolicy
from controlplane.settings_groups import JobSettings


def job_policy(group: JobSettings, allow_unverified_by_default: bool = False) -> JobPolicy:
    """Holds, dispatch and retries as `group` (GPUPLANE_* job settings) sets them."""
    return JobPolicy(
        allow_unverified_by_default=allow_unverified_by_default,
        fee_basis_points=group.fee_basis_points,
        default_max_price=group.default_max_price,
        allow_simulated_by_default=group.allow_simulated_by_default,
        retry_backoff=timedelta(seconds=group.retry_backoff_seconds),
        dispatch_ack_timeout=timedelta(seconds=group.dispatch_ack_timeout_seconds),
        hold_queue_timeout=timedelta(seconds=group.hold_queue_timeout_seconds),
        require_signed_reports=group.require_signed_reports,
        run_time_slack=timedelta(seconds=group.run_time_slack_seconds),
        reconcile_interval=timedelta(seconds=group.reconcile_interval_seconds),
    )
