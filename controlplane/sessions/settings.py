"""Interactive session and host resync settings, mixed into the control plane's Settings."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field
from pydantic_settings import BaseSettings


@dataclass(frozen=True, slots=True)
class SessionSettings:
    host_resync_interval_seconds: float
    warn_lead_seconds: float
    warn_fraction: float
    overdue_grace_seconds: float
    check_interval_seconds: float


class SessionFields(BaseSettings):
    """Sessions' expiry warnings and the control plane's own deadline, and the periodic
    resync that destroys containers no control plane knows (controlplane/sessions)."""

    host_resync_interval_ms: int = Field(
        default=60_000,
        ge=0,
        description="How often each connected host is sent its live attempts (a resync): "
        "any gpuplane container it runs that the control plane does not know is destroyed "
        "and reported; 0 turns the periodic resync off (hellos and disagreeing heartbeats "
        "still resync).",
    )
    session_warn_lead_seconds: int = Field(
        default=600,
        ge=0,
        description="A running session gets an expiry warning (a job event) this long before "
        "it expires, or at session_warn_fraction of its duration before, whichever is less.",
    )
    session_warn_fraction: float = Field(
        default=0.25, ge=0.0, le=1.0, description="See session_warn_lead_seconds."
    )
    session_overdue_grace_ms: int = Field(
        default=30_000,
        gt=0,
        description="A session still running this long past its expiry (its daemon did not "
        "stop it) is stopped by the control plane (TIMED_OUT).",
    )
    session_check_interval_ms: int = Field(
        default=1000, gt=0, description="How often running sessions are checked for expiry."
    )

    @property
    def sessions(self) -> SessionSettings:
        return SessionSettings(
            host_resync_interval_seconds=self.host_resync_interval_ms / 1000,
            warn_lead_seconds=float(self.session_warn_lead_seconds),
            warn_fraction=self.session_warn_fraction,
            overdue_grace_seconds=self.session_overdue_grace_ms / 1000,
            check_interval_seconds=self.session_check_interval_ms / 1000,
        )
