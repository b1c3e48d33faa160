"""Settings of the control plane's trust in providers: onboarding, signed reports and
provenance, the control plane's own clock, and the durable command path to daemons
(GPUPLANE_*), mixed into the control plane's Settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings


class TrustFields(BaseSettings):
    """Fields of Settings about providers' hosts that the control plane does not take on
    trust (issue #15): grouped here so settings.py stays one screenful per domain."""

    self_service_providers: bool = Field(
        default=False,
        description="Whether a provider may mint registration tokens for its own hosts "
        "(self-service onboarding); otherwise only an admin mints them for a provider tenant.",
    )
    require_signed_reports: bool = Field(
        default=True,
        description="Refuse job reports not signed by their host's registered Ed25519 key. "
        "Off, hosts registered by an earlier release (no key) have their reports applied "
        "unsigned; a host that registered a key must sign either way.",
    )
    provenance_key_file: Path | None = Field(
        default=None,
        description="The control plane's Ed25519 key (base64 seed) that countersigns each "
        "attempt's provenance document; every replica must use the same file. Unset: "
        "data_dir/provenance.key, generated once.",
    )
    command_poll_interval_ms: int = Field(
        default=500,
        gt=0,
        description="How often each replica looks for stored commands (cancel, drain) due to "
        "the daemons whose Connect stream it holds (a command stored on the same replica "
        "goes at once).",
    )
    command_resend_ms: int = Field(
        default=2000,
        gt=0,
        description="A command the daemon has not acknowledged is sent again after this, "
        "doubling per delivery up to a minute.",
    )
    run_time_slack_ms: int = Field(
        default=5000,
        ge=0,
        le=86_400_000,
        description="Run time a daemon may report beyond what the control plane observed "
        "(from accepting its RUNNING report to accepting the report); more is capped.",
    )
    reconcile_interval_ms: int = Field(
        default=5000,
        gt=0,
        description="How often each control plane compares the running lists of the daemons "
        "connected to it with their live attempts (a difference seen twice in a row: resync).",
    )
