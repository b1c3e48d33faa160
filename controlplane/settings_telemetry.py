"""GPU telemetry, health and usage settings, mixed into the control plane's Settings."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings


class TelemetryFields(BaseSettings):
    """What the control plane keeps of GPU telemetry and health, and how it writes usage
    (the `telemetry` group: controlplane/registry/telemetry.py, utilization.py)."""

    telemetry_history: int = Field(
        default=60,
        ge=1,
        le=10_000,
        description="Telemetry samples kept in memory per GPU (GetHost's recent).",
    )
    telemetry_max_clock_skew_seconds: float = Field(
        default=60.0, ge=0, description="Samples stamped further ahead of our clock are rejected."
    )
    gpu_clean_period_seconds: float = Field(
        default=600.0,
        gt=0,
        description="An unhealthy GPU is healthy again after this long without a new fault.",
    )
    gpu_ignored_xids: list[int] = Field(
        default=[13, 31, 43, 45, 68, 109],
        description="XIDs that do not make a GPU unhealthy: errors of the application running "
        "on it (as NVIDIA's device plugin ignores them).",
    )
    job_usage_max_attempts: int = Field(
        default=100_000,
        ge=1,
        description="Attempts whose GPU usage is kept in memory between two flushes.",
    )
    job_usage_flush_seconds: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="How often each control plane adds the GPU utilisation it measured to "
        "the attempts' rows (one batched write; also when it stops).",
    )
