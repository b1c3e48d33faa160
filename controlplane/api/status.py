"""The one mapping from errors to gRPC status: the domain error tree by class, and the
failures of a dependency (database, object storage, NATS) as UNAVAILABLE: the client may
retry. Applied once, by the error interceptor."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import nats.errors
import urllib3.exceptions

from controlplane.db.engine import database_unavailable
from controlplane.errors import (
    AlreadyExists,
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from storage.objects import StorageError

STATUS_OF: dict[type[DomainError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    Conflict: grpc.StatusCode.ABORTED,
}


def status_code_for(error: DomainError) -> grpc.StatusCode:
    """The gRPC status of a domain error (its nearest mapped base class)."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


@dataclass(frozen=True, slots=True)
class DependencyDown:
    """A dependency failed: which one (for the log) and what the client is told."""

    dependency: str
    message: str


def dependency_down(error: BaseException) -> DependencyDown | None:
    """What to answer (UNAVAILABLE) for an error that means a dependency cannot serve now;
    None for any other error."""
    if database_unavailable(error):
        return DependencyDown(
            "database", "the database is unavailable; retry the request (with its idempotency key)"
        )
    if isinstance(error, StorageError | urllib3.exceptions.HTTPError):
        return DependencyDown("object storage", f"object storage unavailable: {error}")
    if isinstance(error, nats.errors.Error):
        return DependencyDown("NATS", "the message bus is not reachable; try again")
    return None
