"""The settings fields domains keep in their own packages, mixed into Settings as one."""

from __future__ import annotations

from controlplane.dashboard.settings import DashboardFields
from controlplane.sessions.settings import SessionFields
from controlplane.verification.settings import VerificationFields


class DomainFields(DashboardFields, VerificationFields, SessionFields):
    """The dashboard's, hardware verification's and GPU sessions' fields of Settings."""
