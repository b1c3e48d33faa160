"""Daemon configuration, read from GPUPLANE_DAEMON_* environment variables (flags override)."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from daemon import restarts
from daemon.channel import ChannelSecurity
from messaging.jsonlog import LogFormat
from messaging.secretfiles import apply_secret_files

MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/gpuplane/daemon")
    return Path.home() / ".local" / "share" / "gpuplane" / "daemon"


def derive_machine_id(data_dir: Path, id_files: tuple[Path, ...] = MACHINE_ID_FILES) -> str:
    """A stable id for (this machine, this data dir): two daemons with different data dirs on
    one machine are two hosts; a restarted daemon with the same data dir is the same host."""
    base = ""
    for candidate in id_files:
        try:
            base = candidate.read_text().strip()
        except OSError:
            continue
        if base:
            break
    base = base or f"hostname:{socket.gethostname()}"
    digest = hashlib.sha256(f"{base}\0{data_dir.absolute()}".encode()).hexdigest()
    return digest[:32]


class DaemonSettings(BaseSettings):
    """Every setting of one daemon process. Built once in run_daemon() and passed down."""

    model_config = SettingsConfigDict(env_prefix="GPUPLANE_DAEMON_", env_file=None, extra="ignore")

    control_plane: str = Field(
        default="127.0.0.1:50051",
        description="Control plane gRPC address(es), HOST:PORT; several replicas comma-"
        "separated: the daemon uses the first that answers and fails over in order.",
    )
    plaintext: bool = Field(
        default=False,
        description="Reach the control plane without TLS (dev stacks only); else TLS, "
        "verifying its certificate.",
    )
    tls_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that verifies the control plane's certificate; unset = the "
        "system's roots.",
    )
    tls_cert_file: Path | None = Field(
        default=None,
        description="PEM client certificate (with tls_key_file) for a control plane that "
        "requires client certificates.",
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file.")
    tls_server_name: str = Field(
        default="",
        description="The name the control plane's certificate must carry; empty = the host "
        "of the (first) control-plane address.",
    )
    registration_token: SecretStr | None = Field(
        default=None,
        description="Host registration token; needed until data_dir/host.json exists. Prefer "
        "registration_token_file: a value here is in the process's environment.",
    )
    registration_token_file: Path | None = Field(
        default=None,
        description="File holding the registration token (one trailing newline stripped), e.g. "
        "a systemd credential: $CREDENTIALS_DIRECTORY/registration-token.",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="host.json (identity, mode 0600), the journal and job work dirs.",
    )
    simulate_gpus: str | None = Field(
        default=None, description='Pretend to have GPUs, e.g. "4xA100-80GB" (dev and tests).'
    )
    machine_id: str = Field(
        default="", description="Stable machine identity; empty = derived (see derive_machine_id)."
    )
    hostname: str = Field(default_factory=socket.gethostname)
    price_per_gpu_hour_micro_credits: int = Field(default=2_000_000, gt=0)
    location: str = Field(default="")
    labels: dict[str, str] = Field(default_factory=dict)
    docker_host: str | None = Field(
        default=None, description="Docker engine URL; unset = docker.from_env()."
    )
    gpu_device_requests: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Pass GPUs to containers via device_requests: auto = only for real GPUs.",
    )
    nats_url: str | None = Field(
        default=None, description="NATS server(s), comma-separated; unset = from registration."
    )
    nats_ca_file: Path | None = Field(
        default=None,
        description="PEM CA bundle that verifies the NATS servers' certificates; unset = the "
        "system's roots when a server requires TLS or a URL is tls://.",
    )
    nats_cert_file: Path | None = Field(
        default=None, description="PEM client certificate for NATS servers that verify clients."
    )
    nats_key_file: Path | None = Field(
        default=None, description="PEM private key of nats_cert_file."
    )
    usage_report_interval_seconds: float = Field(default=60.0, gt=0)
    default_pids_limit: int = Field(default=1024, gt=0)
    default_memory_bytes: int = Field(
        default=0,
        ge=0,
        description="Memory limit of a job whose spec sets none; 0 = the engine's memory "
        "divided by this host's GPUs, times the job's GPUs (at least one).",
    )
    default_cpu_millicores: int = Field(
        default=0,
        ge=0,
        description="CPU limit of a job whose spec sets none; 0 = the engine's CPUs divided "
        "by this host's GPUs, times the job's GPUs (at least one).",
    )
    default_shm_bytes: int = Field(default=64 << 20, gt=0)
    scratch_bytes: int = Field(
        default=1 << 30,
        gt=0,
        description="Size of /tmp, a job's writable scratch (tmpfs: it counts toward the "
        "job's memory limit); the rest of the container's root filesystem is read-only.",
    )
    job_user: str = Field(
        default="65534:65534",
        description="USER[:GROUP] a job whose image runs as root is run as when the Docker "
        "engine has no user-namespace remapping (userns-remap); with it, root in the "
        "container is an unprivileged user on the host and the image's user is kept.",
    )
    scrub_timeout_seconds: float = Field(
        default=10.0,
        ge=0,
        description="After an attempt, how long its GPUs get to show no process and their "
        "memory back to baseline before they are quarantined.",
    )
    scrub_memory_slack_bytes: int = Field(
        default=64 << 20, ge=0, description="GPU memory above the baseline still called clean."
    )
    scrub_recheck_seconds: float = Field(
        default=30.0, gt=0, description="How often a quarantined GPU is read again."
    )
    output_max_bytes: int = Field(default=10 << 30, gt=0)
    upload_attempts: int = Field(
        default=5, ge=1, description="Tries to store an attempt's results before upload_failed."
    )
    upload_retry_base_seconds: float = Field(default=1.0, ge=0)
    replica_restart_backoff_seconds: float = Field(
        default=restarts.BASE_SECONDS,
        gt=0,
        description="A service replica whose container exits or fails its liveness probe is "
        "restarted in place after this long, then twice as long each time (daemon/restarts.py).",
    )
    replica_restart_max: int = Field(
        default=restarts.MAX_RESTARTS,
        ge=0,
        description="Restarts in place within replica_restart_window_seconds before a failing "
        "replica's attempt ends instead (its service replaces it, on another host if it can).",
    )
    replica_restart_window_seconds: float = Field(
        default=restarts.WINDOW_SECONDS,
        gt=0,
        description="The window replica_restart_max counts restarts in; the backoff starts "
        "over once the earlier restarts are older than this.",
    )
    max_concurrent_jobs: int = Field(default=64, gt=0)
    heartbeat_interval_ms: int = Field(
        default=2000, gt=0, description="Used until the control plane says otherwise."
    )
    telemetry_interval_ms: int | None = Field(
        default=None,
        gt=0,
        description="GPU telemetry period; unset = the control plane's (HelloAck), else 5000.",
    )
    reconnect_base_seconds: float = Field(
        default=2.0,
        gt=0,
        description="First reconnect window: delays are uniform in [0, base * 2**n] (capped).",
    )
    reconnect_max_seconds: float = Field(default=30.0, gt=0)
    log_level: str = Field(default="INFO")
    metrics_addr: str = Field(
        default="",
        description="Serve Prometheus /metrics on HOST:PORT (e.g. 127.0.0.1:9466; port 0 picks "
        "one; a bare :PORT binds 127.0.0.1 only); empty (the default) serves none.",
    )
    log_format: LogFormat = Field(
        default="text",
        description="text, or json: one JSON object per line with job_id/attempt/host_id.",
    )

    @model_validator(mode="after")
    def _tls_is_consistent(self) -> DaemonSettings:
        self.channel_security()  # raises ChannelConfigError, a ValueError, naming the problem
        if (self.nats_cert_file is None) != (self.nats_key_file is None):
            raise ValueError("nats_cert_file and nats_key_file go together: set both or neither")
        return self

    def attempt_dir(self, job_id: str, attempt: int) -> Path:
        """An attempt's private directory: input/, output/ and the log files."""
        return self.work_dir / f"{job_id}-{attempt}".replace("/", "_")

    def channel_security(self) -> ChannelSecurity:
        """How to reach the control plane (TLS unless plaintext)."""
        return ChannelSecurity(
            plaintext=self.plaintext,
            ca_file=self.tls_ca_file,
            cert_file=self.tls_cert_file,
            key_file=self.tls_key_file,
            server_name=self.tls_server_name,
        )

    @field_validator("metrics_addr")
    @classmethod
    def _metrics_addr_is_host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if value and not (sep and port.isdigit() and int(port) <= 65535):
            raise ValueError(f"want HOST:PORT (e.g. 127.0.0.1:9466), not {value!r}")
        return value

    @model_validator(mode="after")
    def _read_secret_files(self) -> DaemonSettings:
        apply_secret_files(self, ("registration_token",))
        return self

    @model_validator(mode="after")
    def _derive_machine_id(self) -> DaemonSettings:
        if not self.machine_id:
            self.machine_id = derive_machine_id(self.data_dir)
        return self

    @property
    def host_file(self) -> Path:
        return self.data_dir / "host.json"

    @property
    def signing_key_file(self) -> Path:
        """The host's Ed25519 key (mode 0600), created at registration."""
        return self.data_dir / "host.key"

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"
