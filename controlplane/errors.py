"""The domain error tree. No transport codes here: controlplane/api/status.py maps it to
gRPC status codes, once."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error a client may see; its message is safe to show to the caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """The request is malformed; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class NotLeader(FailedPrecondition):
    """This control plane is not (or no longer) the scheduling leader: it may not place."""


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class ResourceExhausted(DomainError):
    pass


class Unavailable(DomainError):
    """A dependency (database, NATS, S3) cannot be reached; the client may retry."""


class Unimplemented(DomainError):
    pass


class Conflict(DomainError):
    """A concurrent change won; retrying the request may succeed."""
