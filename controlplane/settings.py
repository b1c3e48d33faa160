"""Control-plane configuration, read from GPUPLANE_* environment variables or a .env file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from controlplane.dashboard.settings import DashboardFields
from controlplane.services.settings import ServiceFields
from controlplane.sessions.settings import SessionFields
from controlplane.settings_groups import (
    AuthSettings,
    HostSettings,
    JobSettings,
    MetricsSettings,
    NatsSettings,
    PlacementPolicyName,
    PricingSettings,
    SchedulerSettings,
    ServingSettings,
    StorageSettings,
    TelemetrySettings,
)
from controlplane.settings_logging import LoggingFields
from controlplane.settings_secrets import SecretFileFields
from controlplane.settings_telemetry import TelemetryFields
from controlplane.settings_trust import TrustFields
from controlplane.tunnels.settings import TunnelFields
from controlplane.verification.settings import VerificationFields
from messaging.natsjwt import NatsKeys, public_key

# No "optional": grpcio's Python API either requires a verified client certificate or asks
# for none (a half-way mode would accept any certificate unverified).
ClientAuth = Literal["off", "require"]


class Settings(
    DashboardFields,
    VerificationFields,
    TrustFields,
    LoggingFields,
    SecretFileFields,
    SessionFields,
    TunnelFields,
    TelemetryFields,
    ServiceFields,
):
    """Every setting of one control-plane process. Built once in main() and passed down.

    The fields are the environment variables (GPUPLANE_<FIELD>), grouped below by domain;
    each domain reads its group (`settings.jobs`, `settings.scheduler`, ...), where every
    duration is in seconds whatever unit its variable is set in."""

    model_config = SettingsConfigDict(env_prefix="GPUPLANE_", env_file=None, extra="ignore")

    # ---- Process: where its state lives, logging, shutdown.
    data_dir: Path = Field(
        default=Path(".gpuplane"),
        description="Where the embedded database, the generated admin key and logs live.",
    )
    database_url: str = Field(
        default="",
        description=(
            "SQLAlchemy async URL: postgresql+psycopg://… or sqlite+aiosqlite:///…; "
            "empty = SQLite in data_dir."
        ),
    )
    log_level: str = Field(
        default="INFO", description="Logging level: DEBUG, INFO, WARNING or ERROR."
    )
    shutdown_grace_seconds: float = Field(
        default=5.0,
        ge=0,
        description="On SIGTERM: how long RPCs in progress may run on before the server closes.",
    )

    # ---- gRPC API and its TLS (serving).
    listen_addr: str = Field(
        default="127.0.0.1:50051", description="gRPC host:port; port 0 picks one."
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        gt=0,
        description="Largest gRPC message received or sent, in bytes.",
    )
    max_pending_calls: int = Field(
        default=20_000,
        gt=0,
        description="Calls gRPC may queue before this server takes them (grpc.server."
        "max_pending_requests; gRPC's 1,000 answers a fleet reconnecting at once CANCELLED).",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM certificate chain the gRPC API serves TLS with (with tls_key_file); "
        "its SANs name what clients dial (a DNS name, or an IP).",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that signs client certificates (daemons); needed when "
        "tls_client_auth is require.",
    )
    tls_client_auth: ClientAuth = Field(
        default="off",
        description="off: clients need no certificate; require: a client without a "
        "certificate signed by tls_client_ca_file fails the TLS handshake. Either way the "
        "bearer API key or host credential still says who calls.",
    )
    allow_plaintext: bool = Field(
        default=False,
        description="Serve gRPC without TLS when no certificate is set (dev stacks and tests "
        "only). Without it and without tls_cert_file the control plane refuses to start.",
    )

    # ---- API keys and rate limits (auth).
    bootstrap_admin_key: SecretStr | None = Field(
        default=None,
        description="An admin API key to accept from the start (stored hashed). "
        "Unset: one is generated once and written to data_dir/admin.key.",
    )
    auth_cache_ttl_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a verified API key is trusted before re-checking. A revoked key "
        "stops at once on the revoking replica and, through the routes change stream on core "
        "NATS, on the others; this bounds only a revocation that stream lost.",
    )
    rate_limit_per_second: float = Field(
        default=200.0,
        ge=0,
        description="Requests per second each API key may make on average (token bucket); "
        "0 disables. Admin keys, health and the daemons' Connect streams are not limited.",
    )
    rate_limit_burst: int = Field(
        default=400, ge=1, description="Requests an idle API key may make at once."
    )

    # ---- Prometheus metrics (metrics).
    metrics_addr: str = Field(
        default="127.0.0.1:9464",
        description="Prometheus /metrics host:port; port 0 picks one; empty disables.",
    )
    metrics_refresh_seconds: float = Field(
        default=15.0,
        gt=0,
        description="How often each replica refreshes the fleet gauges (jobs and hosts by "
        "state, outbox backlog) from the database.",
    )

    # ---- NATS: servers, TLS, JetStream, auth (nats).
    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server(s), comma-separated."
    )
    nats_stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Replicas of each JetStream stream (DISPATCH, EVENTS, LOGS): 1 on a single "
        "nats-server, 3 on a 3-node cluster. Streams that exist are updated to it at start.",
    )
    nats_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that verifies the NATS servers' certificates (TLS); unset = "
        "the system's roots when a server requires TLS or a URL is tls://.",
    )
    nats_cert_file: Path | None = Field(
        default=None, description="PEM client certificate for NATS servers that verify clients."
    )
    nats_key_file: Path | None = Field(default=None, description="PEM key of nats_cert_file.")
    nats_operator_seed: SecretStr | None = Field(
        default=None,
        description="NATS auth (operator mode): the operator's nkey seed (SO…), which signs "
        "account JWTs. Unset, with the two below, = no NATS auth (open dev servers). "
        "`gpuplane nats init` generates all three and the server config.",
    )
    nats_account_seed: SecretStr | None = Field(
        default=None,
        description="NATS auth: the application account's nkey seed (SA…); it issues the "
        "control plane's own user and each host's scoped user.",
    )
    nats_system_account_seed: SecretStr | None = Field(
        default=None,
        description="NATS auth: the system account's nkey seed (SA…); its user pushes "
        "account JWT updates (host revocations) to the servers.",
    )
    nats_account_sync_interval_seconds: float = Field(
        default=300.0,
        gt=0,
        description="NATS auth: how often the account JWT (with every revocation in the "
        "database) is pushed again, beyond at start and on each revocation.",
    )

    # ---- Object storage (storage).
    s3_endpoint: str = Field(default="127.0.0.1:8333", description="S3 API host:port.")
    s3_access_key: str = Field(default="gpuplane", description="Access key for the S3 API.")
    s3_secret_key: SecretStr = Field(
        default=SecretStr("gpuplane-secret"), description="Secret key for the S3 API."
    )
    s3_secure: bool = Field(default=False, description="Use HTTPS to reach the S3 API.")
    s3_bucket: str = Field(
        default="gpuplane", description="Bucket for job inputs, outputs and logs."
    )

    # ---- Pricing policy and payouts (pricing).
    platform_fee_basis_points: int = Field(
        default=1000, ge=0, le=10_000, description="Platform fee on every charge (1000 = 10%)."
    )
    max_price_per_gpu_hour_micro_credits: int = Field(
        default=100_000_000,
        gt=0,
        description="Ceiling on host prices; the price a job's hold assumes when it names none.",
    )
    min_price_per_gpu_hour_micro_credits: int = Field(
        default=1,
        gt=0,
        description="Lowest host price per GPU-hour that the pricing policy states "
        "(AdminService), in micro-credits.",
    )
    min_payout_micro_credits: int = Field(
        default=1_000_000,
        ge=0,
        description="Smallest payout a provider may request, in micro-credits "
        "(1 credit = 1000000).",
    )

    # ---- Jobs: dispatch, retries, credit holds (jobs).
    allow_simulated_by_default: bool = Field(
        default=False,
        description="Dev stacks: jobs may run on simulated GPUs unless they say otherwise.",
    )
    dispatch_ack_timeout_ms: int = Field(
        default=120_000, gt=0, description="A placed attempt never taken by its daemon is lost."
    )
    retry_backoff_ms: int = Field(
        default=1000, ge=0, description="First retry delay of a lost attempt."
    )
    hold_queue_timeout_seconds: int = Field(
        default=86_400,
        gt=0,
        description="How long a job may wait for placement before its credit hold expires "
        "(the hold lasts this plus the job's max_duration from submit, and again from each "
        "requeue); a queued job whose hold expires fails with hold_expired.",
    )
    hold_expiry_interval_ms: int = Field(
        default=30_000, gt=0, description="How often expired holds are looked for and resolved."
    )
    spending_limit_interval_ms: int = Field(
        default=5000,
        gt=0,
        description="How often each tenant with a monthly spending limit is checked: "
        "thresholds reached are recorded, and its running jobs stopped at the limit.",
    )

    # ---- Hosts: liveness and the periods daemons are told (hosts).
    heartbeat_interval_ms: int = Field(
        default=2000, gt=0, description="How often daemons are told to send a heartbeat."
    )
    heartbeat_timeout_ms: int = Field(
        default=15_000, gt=0, description="A host without a heartbeat this long is lost."
    )
    telemetry_interval_ms: int = Field(
        default=5000,
        gt=0,
        description="GPU telemetry period daemons are told to use, unless they set their own.",
    )

    # ---- Scheduling and its leadership (scheduler).
    scheduler_interval_ms: int = Field(
        default=500, gt=0, description="Period of the scheduler's placement pass."
    )
    default_placement_policy: PlacementPolicyName = Field(
        default="balanced",
        description="Placement policy of jobs that name none (balanced weighs price against "
        "the host's reliability and load).",
    )
    fair_share_half_life_seconds: float = Field(
        default=3600.0, gt=0, description="How fast a tenant's past GPU time stops counting."
    )
    fair_share_horizon_seconds: float = Field(
        default=600.0,
        ge=0,
        description="A running GPU counts toward fair share as if it ran this much longer.",
    )
    reserve_after_seconds: float = Field(
        default=300.0,
        ge=0,
        description="A job queued this long gets a reservation (no starvation by small jobs).",
    )
    max_reservations: int = Field(default=4, ge=0, description="Reservations per cycle.")
    reject_unsatisfiable_after_seconds: float = Field(
        default=300.0,
        ge=0,
        description="A queued job that no registered host (in any state, not revoked) could "
        "ever run is REJECTED, its hold released, once it is this old.",
    )
    scheduler_batch: int = Field(
        default=5000, gt=0, description="Queued jobs one scheduling cycle considers."
    )
    scheduler_leader_check_interval_ms: int = Field(
        default=1000,
        gt=0,
        description="PostgreSQL: how often a replica that is not the scheduling leader tries "
        "to take over (a killed leader is replaced within about this long), and how often the "
        "leader checks the connection holding its lock (a broken one stops it scheduling).",
    )
    scheduler_lease_ttl_ms: int = Field(
        default=10_000,
        gt=0,
        description="PostgreSQL: a scheduling leader that cannot show it is alive for this "
        "long (frozen, cut off) is replaced: the database ends its lock session and any "
        "placement transaction it left idle this long. At least twice the check interval.",
    )

    @model_validator(mode="after")
    def _tls_is_complete(self) -> Settings:
        # Neither a certificate nor allow_plaintext is refused when serving (controlplane/tls.py),
        # not here: one-shots like the migration read these settings too.
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_auth != "off" and self.tls_cert_file is None:
            raise ValueError("tls_client_auth needs tls_cert_file and tls_key_file")
        if self.tls_client_auth == "require" and self.tls_client_ca_file is None:
            raise ValueError("tls_client_auth=require needs tls_client_ca_file")
        if (self.nats_cert_file is None) != (self.nats_key_file is None):
            raise ValueError("nats_cert_file and nats_key_file go together: set both or neither")
        return self

    @model_validator(mode="after")
    def _lease_outlives_checks(self) -> Settings:
        if self.scheduler_lease_ttl_ms < 2 * self.scheduler_leader_check_interval_ms:
            raise ValueError(
                "scheduler_lease_ttl_ms must be at least twice scheduler_leader_check_interval_ms"
            )
        return self

    @model_validator(mode="after")
    def _nats_seeds_together(self) -> Settings:
        seeds = (self.nats_operator_seed, self.nats_account_seed, self.nats_system_account_seed)
        if any(seeds) and not all(seeds):
            raise ValueError(
                "nats_operator_seed, nats_account_seed and nats_system_account_seed are set "
                "together or not at all"
            )
        if all(seeds):
            self.nats_keys()  # validates them
        return self

    def nats_keys(self) -> NatsKeys | None:
        """The NATS auth seeds, or None when NATS auth is off."""
        if not (
            self.nats_operator_seed and self.nats_account_seed and self.nats_system_account_seed
        ):
            return None
        keys = NatsKeys(
            self.nats_operator_seed.get_secret_value().strip(),
            self.nats_account_seed.get_secret_value().strip(),
            self.nats_system_account_seed.get_secret_value().strip(),
        )
        for name, seed, prefix in (
            ("nats_operator_seed", keys.operator_seed, "SO"),
            ("nats_account_seed", keys.account_seed, "SA"),
            ("nats_system_account_seed", keys.system_account_seed, "SA"),
        ):
            if not seed.startswith(prefix):
                raise ValueError(f"{name} must be an nkey seed starting {prefix}")
            public_key(seed)
        if keys.account_seed == keys.system_account_seed:
            raise ValueError("nats_account_seed and nats_system_account_seed must differ")
        return keys

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite inside the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'gpuplane.db').resolve()}"

    # ---- The groups each domain builds its policy from (controlplane/settings_groups.py).

    @property
    def serving(self) -> ServingSettings:
        return ServingSettings(
            listen_addr=self.listen_addr,
            advertise_address=self.advertise_address,
            tunnel_open_timeout_seconds=self.tunnel_open_timeout_ms / 1000,
            tunnel_data_address=self.tunnel_data_address,
            max_message_bytes=self.max_message_bytes,
            max_pending_calls=self.max_pending_calls,
            shutdown_grace_seconds=self.shutdown_grace_seconds,
        )

    @property
    def auth(self) -> AuthSettings:
        key = self.bootstrap_admin_key
        return AuthSettings(
            bootstrap_admin_key=key.get_secret_value() if key else None,
            data_dir=self.data_dir,
            cache_ttl_seconds=self.auth_cache_ttl_seconds,
            rate_limit_per_second=self.rate_limit_per_second,
            rate_limit_burst=self.rate_limit_burst,
        )

    @property
    def metrics(self) -> MetricsSettings:
        return MetricsSettings(
            addr=self.metrics_addr, refresh_interval_seconds=self.metrics_refresh_seconds
        )

    @property
    def nats(self) -> NatsSettings:
        return NatsSettings(
            url=self.nats_url,
            stream_replicas=self.nats_stream_replicas,
            ca_file=self.nats_ca_file,
            cert_file=self.nats_cert_file,
            key_file=self.nats_key_file,
            keys=self.nats_keys(),
            account_sync_interval_seconds=self.nats_account_sync_interval_seconds,
        )

    @property
    def storage(self) -> StorageSettings:
        return StorageSettings(
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key.get_secret_value(),
            secure=self.s3_secure,
            bucket=self.s3_bucket,
        )

    @property
    def pricing(self) -> PricingSettings:
        return PricingSettings(
            fee_basis_points=self.platform_fee_basis_points,
            min_price=self.min_price_per_gpu_hour_micro_credits,
            max_price=self.max_price_per_gpu_hour_micro_credits,
            min_payout=self.min_payout_micro_credits,
        )

    @property
    def jobs(self) -> JobSettings:
        return JobSettings(
            fee_basis_points=self.platform_fee_basis_points,
            default_max_price=self.max_price_per_gpu_hour_micro_credits,
            allow_simulated_by_default=self.allow_simulated_by_default,
            dispatch_ack_timeout_seconds=self.dispatch_ack_timeout_ms / 1000,
            retry_backoff_seconds=self.retry_backoff_ms / 1000,
            hold_queue_timeout_seconds=float(self.hold_queue_timeout_seconds),
            hold_expiry_interval_seconds=self.hold_expiry_interval_ms / 1000,
            spending_limit_interval_seconds=self.spending_limit_interval_ms / 1000,
            require_signed_reports=self.require_signed_reports,
            run_time_slack_seconds=self.run_time_slack_ms / 1000,
            reconcile_interval_seconds=self.reconcile_interval_ms / 1000,
        )

    @property
    def hosts(self) -> HostSettings:
        return HostSettings(
            max_price=self.max_price_per_gpu_hour_micro_credits,
            heartbeat_interval_seconds=self.heartbeat_interval_ms / 1000,
            heartbeat_timeout_seconds=self.heartbeat_timeout_ms / 1000,
            telemetry_interval_seconds=self.telemetry_interval_ms / 1000,
            self_service_providers=self.self_service_providers,
            command_poll_interval_seconds=self.command_poll_interval_ms / 1000,
            command_resend_seconds=self.command_resend_ms / 1000,
        )

    @property
    def telemetry(self) -> TelemetrySettings:
        return TelemetrySettings(
            history=self.telemetry_history,
            max_clock_skew_seconds=self.telemetry_max_clock_skew_seconds,
            clean_period_seconds=self.gpu_clean_period_seconds,
            ignored_xids=tuple(self.gpu_ignored_xids),
            usage_max_attempts=self.job_usage_max_attempts,
            usage_flush_seconds=self.job_usage_flush_seconds,
            forget_after_seconds=self.heartbeat_timeout_ms / 1000,
        )

    @property
    def scheduler(self) -> SchedulerSettings:
        return SchedulerSettings(
            interval_seconds=self.scheduler_interval_ms / 1000,
            default_placement_policy=self.default_placement_policy,
            fair_share_half_life_seconds=self.fair_share_half_life_seconds,
            fair_share_horizon_seconds=self.fair_share_horizon_seconds,
            reserve_after_seconds=self.reserve_after_seconds,
            max_reservations=self.max_reservations,
            reject_unsatisfiable_after_seconds=self.reject_unsatisfiable_after_seconds,
            batch=self.scheduler_batch,
            leader_check_interval_seconds=self.scheduler_leader_check_interval_ms / 1000,
            lease_ttl_seconds=self.scheduler_lease_ttl_ms / 1000,
        )
