"""Long-running services' settings, mixed into the control plane's Settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    reconcile_interval_seconds: float
    backoff_base_seconds: float
    backoff_max_seconds: float
    healthy_reset_seconds: float
    lease_seconds: float
    lease_renew_lead_seconds: float
    gateway_address: str
    gateway_balance: str
    gateway_resync_seconds: float


class ServiceFields(BaseSettings):
    """How the service reconciler (controlplane/services/reconciler.py) keeps replicas."""

    service_reconcile_interval_ms: int = Field(
        default=1000, gt=0, description="How often the leader looks at every active service."
    )
    service_backoff_base_ms: int = Field(
        default=1000,
        gt=0,
        description="A replica that failed is replaced after this long, doubled at each "
        "further failure (up to service_backoff_max_ms); reset after a healthy period.",
    )
    service_backoff_max_ms: int = Field(
        default=300_000, gt=0, description="The most a replacement waits (see above)."
    )
    service_healthy_reset_seconds: int = Field(
        default=60,
        gt=0,
        description="A replica running this long resets its service's failure count.",
    )
    service_lease_seconds: int = Field(
        default=3600,
        gt=0,
        le=30 * 24 * 3600,
        description="A replica is held for (and may run) this long at first; its lease is "
        "extended by as much, the hold topped up, while its service runs.",
    )
    service_lease_renew_lead_seconds: int = Field(
        default=600,
        gt=0,
        description="A replica's lease is extended this long before it runs out; when the "
        "owner's credit cannot pay, a warning is recorded and the service stops at its end.",
    )

    gateway_address: str = Field(
        default="",
        description="host:port the services gateway serves HTTP on (/s/NAME/… to a ready "
        "replica of service NAME: the caller's API key, or a caller key of that service, as "
        "`Authorization: Bearer KEY`); empty: no gateway in this process. Every "
        "control-plane replica may serve one.",
    )

    gateway_balance: Literal["round_robin", "least_outstanding"] = Field(
        default="round_robin",
        description="How the gateway picks among a service's ready replicas: in turn, or the "
        "one with the fewest requests in flight.",
    )

    gateway_resync_ms: int = Field(
        default=5000,
        gt=0,
        description="How often the gateway rereads its whole routing table. Changes reach it "
        "at once through the control plane's change stream; this bounds how long one that "
        "stream lost (NATS down) leaves a route stale.",
    )

    @property
    def services(self) -> ServiceSettings:
        return ServiceSettings(
            reconcile_interval_seconds=self.service_reconcile_interval_ms / 1000,
            backoff_base_seconds=self.service_backoff_base_ms / 1000,
            backoff_max_seconds=self.service_backoff_max_ms / 1000,
            healthy_reset_seconds=float(self.service_healthy_reset_seconds),
            lease_seconds=float(self.service_lease_seconds),
            lease_renew_lead_seconds=float(self.service_lease_renew_lead_seconds),
            gateway_address=self.gateway_address,
            gateway_balance=self.gateway_balance,
            gateway_resync_seconds=self.gateway_resync_ms / 1000,
        )
