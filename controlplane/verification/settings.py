"""Hardware verification settings (GPUPLANE_PROBE_*), mixed into the control plane's Settings."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings

from controlplane.verification.challenge import MAX_TERMS


@dataclass(frozen=True, slots=True)
class VerificationSettings:
    image: str
    n: int
    rounds: int
    allowance_ms: int
    slack: float
    reverify_seconds: float
    retry_seconds: float
    allow_unverified_by_default: bool


class VerificationFields(BaseSettings):
    """The verification probe's fields of Settings (controlplane/verification)."""

    probe_image: str = Field(
        default="ghcr.io/gpuplane/probe:1",
        description="Image the daemon runs as the hardware verification probe (deploy/probe).",
    )
    probe_n: int = Field(
        default=512, ge=1, le=4096, description="Side of the probe's matrices (n×n)."
    )
    probe_rounds: int = Field(
        default=4, ge=1, description="Matrix products each GPU sums (work grows with it)."
    )
    probe_allowance_ms: int = Field(
        default=60_000,
        ge=0,
        description="Added to each probe's deadline: starting its container, sending back.",
    )
    probe_slack: float = Field(
        default=4.0, ge=1.0, description="The claimed model's compute time is multiplied by this."
    )
    probe_reverify_seconds: int = Field(
        default=24 * 3600, gt=0, description="A verified host is probed again after this."
    )
    probe_retry_seconds: int = Field(
        default=600, gt=0, description="A host whose probe failed is probed again after this."
    )
    allow_unverified_by_default: bool = Field(
        default=False,
        description="Dev and test stacks: jobs may run on unverified hosts unless they say "
        "otherwise (production: only when a job sets allow_unverified).",
    )

    @model_validator(mode="after")
    def _exact(self) -> VerificationFields:
        if self.probe_n * self.probe_rounds > MAX_TERMS:
            raise ValueError(
                f"probe_n × probe_rounds must be at most {MAX_TERMS} (fp32-exact products)"
            )
        return self

    @property
    def verification(self) -> VerificationSettings:
        return VerificationSettings(
            image=self.probe_image,
            n=self.probe_n,
            rounds=self.probe_rounds,
            allowance_ms=self.probe_allowance_ms,
            slack=self.probe_slack,
            reverify_seconds=float(self.probe_reverify_seconds),
            retry_seconds=float(self.probe_retry_seconds),
            allow_unverified_by_default=self.allow_unverified_by_default,
        )
