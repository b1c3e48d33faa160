"""Imports every domain's ORM models so Base.metadata is complete (Alembic, tests)."""

from controlplane.auth.models import ApiKey, Tenant
from controlplane.db.base import Base
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.ledger.models import Account, Transfer
from controlplane.outbox.models import OutboxMessage
from controlplane.registry.models import Gpu, Host, RegistrationToken

__all__ = [
    "Account",
    "ApiKey",
    "Base",
    "Gpu",
    "Host",
    "Job",
    "JobAttempt",
    "JobEvent",
    "OutboxMessage",
    "RegistrationToken",
    "Tenant",
    "Transfer",
]
