"""The registry's policies (GPU telemetry and health, host liveness), built from their groups."""

from __future__ import annotations

from controlplane.registry.monitor import MonitorPolicy
from controlplane.settings_groups import HostSettings, TelemetrySettings


def monitor_policy(group: TelemetrySettings) -> MonitorPolicy:
    """What the GPU monitor keeps and when a GPU is healthy again, as `group` sets it."""
    return MonitorPolicy(
        history=group.history,
        clean_period_seconds=group.clean_period_seconds,
        max_clock_skew_seconds=group.max_clock_skew_seconds,
        ignored_xids=group.ignored_xids,
        usage_max_attempts=group.usage_max_attempts,
        usage_flush_seconds=group.usage_flush_seconds,
        forget_after_seconds=group.forget_after_seconds,
    )


def heartbeat_write_interval(group: HostSettings) -> float:
    """How often buffered heartbeats are written: the liveness loop's tick (background.py),
    a quarter of the timeout and at most a second."""
    return min(1.0, group.heartbeat_timeout_seconds / 4)
