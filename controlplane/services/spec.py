"""What a DeployService asks for, checked field by field, as the JobSpec each replica runs."""

from __future__ import annotations

import re

from gpuplane.v1 import types_pb2

from controlplane.errors import InvalidArgument

# The most replicas one service may ask for (documented in services.proto).
MAX_REPLICAS = 32
MAX_HEALTH_PATH = 200
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# Printable ASCII without spaces: a URL path.
_PATH = re.compile(r"^/[\x21-\x7e]*$")
# Fields of a job's spec a service decides itself (its lease, hold and replacement).
_SERVICE_OWNED = (
    ("max_duration_seconds", "a replica runs until the service is stopped"),
    ("budget_micro_credits", "a replica is held for its lease and topped up as it runs"),
    ("retry_on_exit_codes", "a replica that ended is replaced by the service"),
)


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            "name",
            "1-63 characters: lower-case letters, digits and '-', starting with a letter",
        )
    return name


def validate_replicas(replicas: int) -> int:
    if replicas < 0 or replicas > MAX_REPLICAS:
        raise InvalidArgument("replicas", f"must be 0 to {MAX_REPLICAS}")
    return replicas


def validate_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise InvalidArgument("port", "must be 1 to 65535")
    return port


def validate_health_path(path: str) -> str:
    """An HTTP path ("/healthz"), or empty (a TCP connect); a URL with a scheme is refused."""
    if not path:
        return path
    if "://" in path:
        raise InvalidArgument(
            "health_path", "give a path starting with '/' (the probe speaks HTTP to the port)"
        )
    if len(path) > MAX_HEALTH_PATH or not _PATH.match(path):
        raise InvalidArgument(
            "health_path",
            f"must start with '/', without spaces, at most {MAX_HEALTH_PATH} characters",
        )
    return path


def replica_spec(
    spec: types_pb2.JobSpec, port: int, health_path: str, lease_seconds: int
) -> types_pb2.JobSpec:
    """The spec of the service's replicas: `spec` with the lease as its max duration, no
    retries and its service_replica part (service_id left to stamp); the fields a service
    decides itself must be unset (InvalidArgument naming them)."""
    for name, why in _SERVICE_OWNED:
        if getattr(spec, name):
            raise InvalidArgument(f"spec.{name}", f"must be unset: {why}")
    if spec.HasField("max_retries") and spec.max_retries:
        raise InvalidArgument("spec.max_retries", "must be unset: the service replaces replicas")
    if spec.HasField("session"):
        raise InvalidArgument("spec.session", "must be unset: a service is not a session")
    if spec.HasField("service_replica"):
        raise InvalidArgument("spec.service_replica", "must be unset: give port and health_path")
    made = types_pb2.JobSpec()
    made.CopyFrom(spec)
    made.max_duration_seconds = lease_seconds
    made.max_retries = 0  # an ended replica is replaced by the reconciler, on another host
    made.service_replica.port = validate_port(port)
    made.service_replica.health_path = validate_health_path(health_path)
    return made
