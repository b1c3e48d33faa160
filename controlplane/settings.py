"""Control-plane configuration, read from GPUPLANE_* environment variables or a .env file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from messaging.natsjwt import NatsKeys, public_key

# No "optional": grpcio's Python API either requires a verified client certificate or asks
# for none (a half-way mode would accept any certificate unverified).
ClientAuth = Literal["off", "require"]


class Settings(BaseSettings):
    """Every setting of one control-plane process. Built once in main() and passed down."""

    model_config = SettingsConfigDict(env_prefix="GPUPLANE_", env_file=None, extra="ignore")

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
    listen_addr: str = Field(
        default="127.0.0.1:50051", description="gRPC host:port; port 0 picks one."
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
    bootstrap_admin_key: SecretStr | None = Field(
        default=None,
        description="An admin API key to accept from the start (stored hashed). "
        "Unset: one is generated once and written to data_dir/admin.key.",
    )
    nats_url: str = Field(
        default="nats://127.0.0.1:4222", description="NATS server(s), comma-separated."
    )
    nats_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that verifies the NATS servers' certificates (TLS); unset = "
        "the system's roots when a server requires TLS or a URL is tls://.",
    )
    nats_cert_file: Path | None = Field(
        default=None, description="PEM client certificate for NATS servers that verify clients."
    )
    nats_key_file: Path | None = Field(
        default=None, description="PEM private key of nats_cert_file."
    )
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
    s3_endpoint: str = Field(default="127.0.0.1:8333", description="S3 API host:port.")
    s3_access_key: str = Field(default="gpuplane")
    s3_secret_key: SecretStr = Field(default=SecretStr("gpuplane-secret"))
    s3_secure: bool = Field(default=False, description="Use HTTPS to reach the S3 API.")
    s3_bucket: str = Field(
        default="gpuplane", description="Bucket for job inputs, outputs and logs."
    )
    platform_fee_basis_points: int = Field(
        default=1000, ge=0, le=10_000, description="Platform fee on every charge (1000 = 10%)."
    )
    max_price_per_gpu_hour_micro_credits: int = Field(
        default=100_000_000,
        gt=0,
        description="Ceiling on host prices; the price a job's hold assumes when it names none.",
    )
    min_price_per_gpu_hour_micro_credits: int = Field(default=1, gt=0)
    min_payout_micro_credits: int = Field(default=1_000_000, ge=0)
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
    nats_stream_replicas: int = Field(default=1, ge=1, le=5)
    dispatch_ack_timeout_ms: int = Field(
        default=120_000, gt=0, description="A placed attempt never taken by its daemon is lost."
    )
    retry_backoff_ms: int = Field(
        default=1000, ge=0, description="First retry delay of a lost attempt."
    )
    heartbeat_interval_ms: int = Field(default=2000, gt=0)
    heartbeat_timeout_ms: int = Field(
        default=15_000, gt=0, description="A host without a heartbeat this long is lost."
    )
    telemetry_interval_ms: int = Field(default=5000, gt=0)
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
        default=100_000, ge=1, description="Attempts whose GPU usage is kept in memory."
    )
    scheduler_interval_ms: int = Field(default=500, gt=0)
    default_placement_policy: Literal["cheapest", "balanced", "pack", "spread"] = Field(
        default="cheapest", description="Placement policy of jobs that name none."
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
    allow_simulated_by_default: bool = Field(
        default=False,
        description="Dev stacks: jobs may run on simulated GPUs unless they say otherwise.",
    )
    auth_cache_ttl_seconds: float = Field(
        default=5.0, ge=0, description="How long a verified API key is trusted before re-checking."
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
    shutdown_grace_seconds: float = Field(default=5.0, ge=0)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    log_level: str = Field(default="INFO")

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
