"""Conversions shared by servicers: timestamps, enums, and domain rows to messages."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import types_pb2

from controlplane.auth.principal import Role
from controlplane.errors import InvalidArgument

ROLE_TO_PB = {
    Role.ADMIN: types_pb2.ROLE_ADMIN,
    Role.CONSUMER: types_pb2.ROLE_CONSUMER,
    Role.PROVIDER: types_pb2.ROLE_PROVIDER,
    Role.HOST: types_pb2.ROLE_HOST,
}
PB_TO_ROLE = {v: k for k, v in ROLE_TO_PB.items()}


def timestamp(value: datetime | None) -> Timestamp | None:
    """A protobuf Timestamp, or None (leaves the field unset) for None."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


def from_timestamp(message: object, field: str) -> datetime | None:
    """The datetime in an optional Timestamp field of `message`, None when unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    ts: Timestamp = getattr(message, field)
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "is not a valid timestamp") from None


def role_from_pb(value: int, field: str = "role") -> Role:
    role: Role | None = PB_TO_ROLE.get(value)  # type: ignore[call-overload]
    if role is None:
        raise InvalidArgument(field, "must be ROLE_ADMIN, ROLE_CONSUMER or ROLE_PROVIDER")
    return role
