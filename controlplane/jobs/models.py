"""ORM classes for jobs, their attempts and their recorded state changes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime, utcnow


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        Index("ix_jobs_state_priority", "state", "priority", "created_at"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    # The JobSpec as submitted (protobuf bytes, deterministic encoding).
    spec: Mapped[bytes] = mapped_column(LargeBinary)
    # JobState, written only by jobs.states (set_job_state and its batch form).
    state: Mapped[str] = mapped_column(String(16))
    state_reason: Mapped[str] = mapped_column(String(1000), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    gpu_count: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    host_id: Mapped[str | None] = mapped_column(String(40))
    gpu_uuids: Mapped[list[str]] = mapped_column(JSON, default=list)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger, default=0)
    hold_amount: Mapped[int] = mapped_column(BigInteger, default=0)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A requeued attempt is not placed before this instant (retry backoff).
    not_before: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))


class JobAttempt(Base):
    __tablename__ = "job_attempts"
    __table_args__ = (
        Index("ix_job_attempts_host_live", "host_id", "live"),
        Index("ix_job_attempts_budget_stop_at", "budget_stop_at"),
    )

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[str] = mapped_column(String(40))
    gpu_uuids: Mapped[list[str]] = mapped_column(JSON, default=list)
    # AttemptState; it, live and lost are written only by jobs.states (set_attempt_state).
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1000), default="")
    # True while the attempt may still run: it holds GPUs and its reports are accepted.
    live: Mapped[bool] = mapped_column(Boolean, default=True)
    # Lost to a provider fault: never charged.
    lost: Mapped[bool] = mapped_column(Boolean, default=False)
    report_seq: Mapped[int] = mapped_column(Integer, default=0)
    run_time_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    charged: Mapped[int] = mapped_column(BigInteger, default=0)
    manifest: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # What was left of the job's budget when this attempt was placed (micro-credits) and the
    # run time it pays for at the placement's price (jobs/budget.py); None: no budget.
    budget: Mapped[int | None] = mapped_column(BigInteger)
    budget_ms: Mapped[int | None] = mapped_column(BigInteger)
    # While it runs (set and cleared by set_attempt_state): when the control plane saw it
    # start + budget_ms, the deadline of the control plane's own budget stop.
    budget_stop_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # GPU utilisation measured from telemetry (registry/utilization.py): the sum of the
    # samples' utilization_gpu_percent over its GPUs, their count, and the peak memory its
    # processes held on one GPU. Only ever increased, by each control plane's flush.
    gpu_utilization_sum: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    gpu_utilization_samples: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    peak_gpu_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The host's signed part of the attempt's provenance (canonical JSON) and its signature,
    # from the terminal report; the countersigned document is built from them when the attempt
    # is settled (jobs/provenance.py) and stored in `provenance`.
    host_provenance: Mapped[bytes | None] = mapped_column(LargeBinary)
    host_provenance_signature: Mapped[bytes | None] = mapped_column(LargeBinary)
    provenance: Mapped[str | None] = mapped_column(Text)
    # Reports whose run time exceeded what the control plane observed, and were capped
    # (jobs/clock.py); the first one costs the host reliability, once per attempt.
    capped_reports: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class JobEvent(Base):
    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1000), default="")
    exit_code: Mapped[int | None] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
