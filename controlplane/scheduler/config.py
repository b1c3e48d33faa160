"""The scheduler's policy, built from its settings group."""

from __future__ import annotations

from controlplane.scheduler.demand import Policy
from controlplane.scheduler.fairshare import FairShareConfig
from controlplane.scheduler.planner import PlannerConfig
from controlplane.scheduler.service import SchedulerPolicy
from controlplane.settings_groups import SchedulerSettings

POLICY_NAMES = {
    "cheapest": Policy.PLACEMENT_POLICY_CHEAPEST,
    "balanced": Policy.PLACEMENT_POLICY_BALANCED,
    "pack": Policy.PLACEMENT_POLICY_PACK,
    "spread": Policy.PLACEMENT_POLICY_SPREAD,
}


def scheduler_policy(group: SchedulerSettings) -> SchedulerPolicy:
    """Default placement, fair share, reservations and batch size as `group` sets them."""
    return SchedulerPolicy(
        default_policy=POLICY_NAMES[group.default_placement_policy],
        fair_share=FairShareConfig(
            half_life_s=group.fair_share_half_life_seconds,
            horizon_s=group.fair_share_horizon_seconds,
        ),
        planner=PlannerConfig(
            reserve_after_s=group.reserve_after_seconds,
            max_reservations=group.max_reservations,
        ),
        batch=group.batch,
        reject_after_s=group.reject_unsatisfiable_after_seconds,
        per_tenant=max(1, group.batch // 5),
    )
