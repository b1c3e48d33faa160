"""Imports every domain's ORM models so Base.metadata is complete (Alembic, tests)."""

from controlplane.auth.models import ApiKey, BrowserSession, Tenant
from controlplane.commands.models import HostCommand, HostStreamHolder
from controlplane.data.models import InputRecord
from controlplane.db.base import Base
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.ledger.models import (
    Account,
    Hold,
    Payout,
    SpendingAlert,
    SpendingLimit,
    Transfer,
)
from controlplane.outbox.models import OutboxMessage
from controlplane.registry.models import Gpu, Host, HostEvent, RegistrationToken
from controlplane.scheduler.models import SchedulerLease
from controlplane.services.models import Service, ServiceEvent, ServiceReplica
from controlplane.verification.models import HostProbe

__all__ = [
    "Account",
    "ApiKey",
    "Base",
    "BrowserSession",
    "Gpu",
    "Hold",
    "Host",
    "HostCommand",
    "HostEvent",
    "HostProbe",
    "HostStreamHolder",
    "InputRecord",
    "Job",
    "JobAttempt",
    "JobEvent",
    "OutboxMessage",
    "Payout",
    "RegistrationToken",
    "SchedulerLease",
    "Service",
    "ServiceEvent",
    "ServiceReplica",
    "SpendingAlert",
    "SpendingLimit",
    "Tenant",
    "Transfer",
]
