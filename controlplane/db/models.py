"""Imports every domain's ORM models so Base.metadata is complete (Alembic, tests)."""

from controlplane.auth.models import ApiKey, Tenant
from controlplane.db.base import Base

__all__ = ["ApiKey", "Base", "Tenant"]
