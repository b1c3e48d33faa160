"""Settings: the GPUPLANE_* variables keep their names and units; each domain's group is in
seconds, and the policies its package builds from it carry the same values."""

from __future__ import annotations

from datetime import timedelta

import pytest

from controlplane.jobs.config import job_policy
from controlplane.registry.config import heartbeat_write_interval, monitor_policy
from controlplane.scheduler.config import scheduler_policy
from controlplane.scheduler.demand import Policy
from controlplane.settings import Settings

# One variable per unit a duration is set in today (ms, whole seconds, float seconds).
ENV = {
    "GPUPLANE_DISPATCH_ACK_TIMEOUT_MS": "90000",
    "GPUPLANE_RETRY_BACKOFF_MS": "250",
    "GPUPLANE_HOLD_QUEUE_TIMEOUT_SECONDS": "3600",
    "GPUPLANE_HOLD_EXPIRY_INTERVAL_MS": "1500",
    "GPUPLANE_HEARTBEAT_INTERVAL_MS": "1000",
    "GPUPLANE_HEARTBEAT_TIMEOUT_MS": "2000",
    "GPUPLANE_TELEMETRY_INTERVAL_MS": "750",
    "GPUPLANE_SCHEDULER_INTERVAL_MS": "100",
    "GPUPLANE_SCHEDULER_LEADER_CHECK_INTERVAL_MS": "400",
    "GPUPLANE_SCHEDULER_LEASE_TTL_MS": "900",
    "GPUPLANE_SCHEDULER_BATCH": "12",
    "GPUPLANE_DEFAULT_PLACEMENT_POLICY": "spread",
    "GPUPLANE_GPU_CLEAN_PERIOD_SECONDS": "7.5",
    "GPUPLANE_GPU_IGNORED_XIDS": "[13, 31]",
    "GPUPLANE_METRICS_REFRESH_SECONDS": "2.5",
    "GPUPLANE_AUTH_CACHE_TTL_SECONDS": "0.5",
}


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_groups_are_in_seconds(settings: Settings) -> None:
    jobs, hosts, scheduler = settings.jobs, settings.hosts, settings.scheduler
    assert (
        jobs.dispatch_ack_timeout_seconds,
        jobs.retry_backoff_seconds,
        jobs.hold_queue_timeout_seconds,
        jobs.hold_expiry_interval_seconds,
    ) == (90.0, 0.25, 3600.0, 1.5)
    assert (
        hosts.heartbeat_interval_seconds,
        hosts.heartbeat_timeout_seconds,
        hosts.telemetry_interval_seconds,
    ) == (1.0, 2.0, 0.75)
    assert (
        scheduler.interval_seconds,
        scheduler.leader_check_interval_seconds,
        scheduler.lease_ttl_seconds,
    ) == (0.1, 0.4, 0.9)
    assert settings.telemetry.clean_period_seconds == 7.5
    assert settings.telemetry.forget_after_seconds == 2.0
    assert settings.metrics.refresh_interval_seconds == 2.5
    assert settings.auth.cache_ttl_seconds == 0.5


def test_domain_policies_from_groups(settings: Settings) -> None:
    jobs = job_policy(settings.jobs)
    assert jobs.dispatch_ack_timeout == timedelta(seconds=90)
    assert jobs.retry_backoff == timedelta(milliseconds=250)
    assert jobs.hold_queue_timeout == timedelta(hours=1)
    assert jobs.fee_basis_points == settings.platform_fee_basis_points
    assert jobs.default_max_price == settings.max_price_per_gpu_hour_micro_credits
    monitor = monitor_policy(settings.telemetry)
    assert monitor.ignored_xids == (13, 31)
    assert monitor.forget_after_seconds == 2.0
    assert heartbeat_write_interval(settings.hosts) == 0.5
    scheduling = scheduler_policy(settings.scheduler)
    assert scheduling.default_policy == Policy.PLACEMENT_POLICY_SPREAD
    assert (scheduling.batch, scheduling.per_tenant) == (12, 2)


def test_secrets_and_nats_keys_reach_their_groups() -> None:
    settings = Settings(bootstrap_admin_key="gpk_x", s3_secret_key="s3-secret")
    assert settings.auth.bootstrap_admin_key == "gpk_x"
    assert settings.storage.secret_key == "s3-secret"
    assert Settings().auth.bootstrap_admin_key is None
    assert settings.nats.keys is None
