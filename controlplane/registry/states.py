"""The host state machine: its table, its only setter and its history (host_events)."""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from gpuplane.v1 import types_pb2

from controlplane.registry.models import Host, HostEvent
from controlplane.statemachine import StateMachine, register

log = logging.getLogger(__name__)


class HostState(StrEnum):
    REGISTERED = "registered"
    ONLINE = "online"
    LOST = "lost"
    DRAINING = "draining"
    DRAINED = "drained"

    @property
    def pb(self) -> types_pb2.HostState.ValueType:
        return types_pb2.HostState.Value(f"HOST_STATE_{self.name}")

    @classmethod
    def from_pb(cls, value: types_pb2.HostState.ValueType) -> HostState:
        return cls[types_pb2.HostState.Name(value).removeprefix("HOST_STATE_")]


H = HostState
_HEARTBEAT_LOST = "no heartbeat within the liveness timeout (a drain request is kept)"
# Only ONLINE hosts take new placements (scheduler.capacity.SCHEDULABLE_HOST_STATES): a
# host that registered but never connected is REGISTERED and offers nothing, so registering
# fresh machine ids at a low price pulls no job from real hosts. A revoked host stays LOST:
# its credential is refused, so it never heartbeats again.
HOST = register(
    StateMachine(
        "host",
        HostState,
        H.REGISTERED,
        {
            H.REGISTERED: {
                H.ONLINE: "its daemon connected and said hello (self-service: and it passed "
                "its verification probe)",
                H.DRAINING: "its daemon said hello with a drain requested before (self-service: "
                "and it passed its verification probe)",
                H.LOST: "RevokeHost before its daemon ever connected",
            },
            H.ONLINE: {
                H.LOST: "no heartbeat within the liveness timeout, or RevokeHost",
                H.DRAINING: "DrainHost: no new jobs, running ones finish",
            },
            H.DRAINING: {
                H.DRAINED: "no live attempt is left on the host",
                H.ONLINE: "UndrainHost",
                H.LOST: f"{_HEARTBEAT_LOST}, or RevokeHost",
            },
            H.DRAINED: {
                H.ONLINE: "UndrainHost",
                H.LOST: f"{_HEARTBEAT_LOST}, or RevokeHost",
            },
            H.LOST: {
                H.ONLINE: "heartbeats again and no drain was requested",
                H.DRAINING: "heartbeats again with a drain requested before or while lost",
            },
        },
    )
)


class Adder(Protocol):
    """Where the history rows go (a RegistryRepository)."""

    def add(self, row: Host | HostEvent) -> None: ...


def new_host(
    events: Adder, *, host_id: str, provider_tenant_id: str, machine_id: str, now: datetime
) -> Host:
    """A newly registered host, REGISTERED (offered only once its daemon says hello), its
    first state recorded through the setter's path."""
    host = Host(
        id=host_id,
        provider_tenant_id=provider_tenant_id,
        machine_id=machine_id,
        registered_at=now,
        lost_attempts=0,
        completed_attempts=0,
        reliability_good=0.0,
        reliability_bad=0.0,
        drain_reason="",
    )
    events.add(host)
    _enter(events, host, HOST.initial, "RegisterHost", now)
    return host


def set_host_state(events: Adder, host: Host, target: HostState, why: str, now: datetime) -> bool:
    """The host's only setter: moves `host` to `target` and records why in host_events;
    False (nothing changed) when it is already there or the edge is not in HOST's table."""
    current = HostState(host.state)
    if not HOST.check(current, target):
        return False
    _enter(events, host, target, why, now)
    log.info(
        "host %s: %s → %s (%s)",
        host.id,
        current.value,
        target.value,
        why,
        extra={"host_id": host.id},
    )
    return True


def _enter(events: Adder, host: Host, target: HostState, why: str, now: datetime) -> None:
    host.state = target.value
    events.add(HostEvent(host_id=host.id, state=target.value, reason=why[:1000], time=now))


def returning_state(host: Host) -> HostState:
    """Where a lost host goes when it heartbeats again: draining if a drain was requested."""
    return H.DRAINING if host.drain_reason else H.ONLINE


def hello_state(host: Host) -> HostState | None:
    """Where a REGISTERED host goes when its daemon says hello (None: it stays REGISTERED).

    This is the admission gate: hardware verification (issue #15, "Hardware verified before
    it is sold") adds its check here, so that a host whose probe has not passed stays
    REGISTERED and is never offered. A host registered with a token its provider minted
    itself (`host.self_service`, GPUPLANE_SELF_SERVICE_PROVIDERS) must pass it whatever else
    the operator allows: it stays REGISTERED until its probe passes (verification.service
    admits it then). Other hosts go online unverified, for jobs that allow it."""
    if host.self_service and host.verified_at is None:
        return None
    return returning_state(host)


def set_verification(
    events: Adder, host: Host, fingerprint: str | None, why: str, now: datetime
) -> bool:
    """The verification flag's only setter: verified for the GPUs and driver hashed in
    `fingerprint` (a probe passed), or not (None) because of `why`; the change is recorded in
    host_events beside the host's state. False when nothing changed."""
    verified = fingerprint is not None
    if verified == (host.verified_at is not None) and (
        host.verified_fingerprint == fingerprint if verified else host.verification_reason == why
    ):
        return False
    host.verified_at = now if verified else None
    host.verified_fingerprint = fingerprint or ""
    host.verification_reason = "" if verified else why[:500]
    label = "verified" if verified else "unverified"
    events.add(
        HostEvent(host_id=host.id, state=host.state, reason=f"{label}: {why}"[:1000], time=now)
    )
    log.info("host %s: %s (%s)", host.id, label, why, extra={"host_id": host.id})
    return True
