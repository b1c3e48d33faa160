"""Per-domain groups of the control-plane settings: read-only, every duration in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from messaging.natsjwt import NatsKeys

# The environment variables keep their names (and so their units: _MS, _SECONDS) as
# deployments set them; Settings converts once, here every duration is float seconds.

PlacementPolicyName = Literal["cheapest", "balanced", "pack", "spread"]


@dataclass(frozen=True, slots=True)
class ServingSettings:
    """The gRPC API of one process."""

    listen_addr: str
    # Where daemons call this replica back for tunnels ("": derived from listen_addr).
    advertise_address: str
    tunnel_open_timeout_seconds: float
    # host:port of the raw tunnel data port ("": none; port 0 picks one).
    tunnel_data_address: str
    max_message_bytes: int
    # Calls gRPC core queues before the server takes them (a fleet reconnecting at once).
    max_pending_calls: int
    # On SIGTERM, how long RPCs in progress may run on before the server closes.
    shutdown_grace_seconds: float

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments."""
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # HTTP/2 frames up to 1 MiB: a 256 KiB tunnel frame in one (daemon/channel.py).
            ("grpc.http2.max_frame_size", 1 << 20),
            # Thousands of daemons reconnecting at once queue here instead of being answered
            # CANCELLED (gRPC's own soft limit is 1,000, its hard limit 3,000).
            ("grpc.server.max_pending_requests", self.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", self.max_pending_calls),
        ]


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """API keys: the bootstrap admin key, the verified-key cache and per-key rate limits."""

    bootstrap_admin_key: str | None
    data_dir: Path  # where a generated admin key is written
    cache_ttl_seconds: float
    rate_limit_per_second: float  # 0 = unlimited
    rate_limit_burst: int


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus endpoint and the fleet gauges every replica refreshes."""

    addr: str  # empty = no endpoint
    refresh_interval_seconds: float


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """The NATS servers, their TLS, JetStream replication and NATS auth (operator mode)."""

    url: str
    stream_replicas: int
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    keys: NatsKeys | None  # None = NATS auth off
    account_sync_interval_seconds: float


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """The S3-compatible object storage of job inputs, outputs and logs."""

    endpoint: str
    access_key: str
    secret_key: str
    secure: bool
    bucket: str


@dataclass(frozen=True, slots=True)
class PricingSettings:
    """The pricing policy (prices in micro-credits per GPU-hour) and the ledger's payout floor."""

    fee_basis_points: int
    min_price: int
    max_price: int
    min_payout: int  # micro-credits


@dataclass(frozen=True, slots=True)
class JobSettings:
    """Job lifecycle: the hold a submit places, dispatch, retries and hold expiry."""

    fee_basis_points: int
    # Price a job's hold assumes when the job names none (the pricing policy's ceiling).
    default_max_price: int
    allow_simulated_by_default: bool
    dispatch_ack_timeout_seconds: float
    retry_backoff_seconds: float
    hold_queue_timeout_seconds: float
    hold_expiry_interval_seconds: float
    spending_limit_interval_seconds: float
    # Reports not signed by their host's key are refused (jobs/signatures.py).
    require_signed_reports: bool = True
    # Run time a report may claim beyond what the control plane observed (jobs/clock.py).
    run_time_slack_seconds: float = 5.0
    # How often running lists from heartbeats are compared with live attempts.
    reconcile_interval_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class HostSettings:
    """Provider hosts: their price ceiling, liveness, and the periods daemons are told."""

    max_price: int
    heartbeat_interval_seconds: float
    heartbeat_timeout_seconds: float
    telemetry_interval_seconds: float
    command_poll_interval_seconds: float
    command_resend_seconds: float
    # Providers may mint their own registration tokens (else only admins mint them).
    self_service_providers: bool = False


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """GPU telemetry kept in memory, GPU health, and per-attempt GPU usage."""

    history: int  # samples per GPU
    max_clock_skew_seconds: float
    clean_period_seconds: float
    ignored_xids: tuple[int, ...]
    usage_max_attempts: int
    usage_flush_seconds: float  # measured utilisation is written this often
    # A host whose Connect stream closed is forgotten after this long (its liveness timeout).
    forget_after_seconds: float


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """Scheduling cycles, fair share, reservations and scheduling leadership."""

    interval_seconds: float
    default_placement_policy: PlacementPolicyName
    fair_share_half_life_seconds: float
    fair_share_horizon_seconds: float
    reserve_after_seconds: float
    max_reservations: int
    reject_unsatisfiable_after_seconds: float
    batch: int
    leader_check_interval_seconds: float
    lease_ttl_seconds: float
