"""The host state machine: states, the transition table (one comment per edge) and transition()."""

from __future__ import annotations

import logging
from enum import StrEnum

from gpuplane.v1 import types_pb2

from controlplane.registry.models import Host

log = logging.getLogger(__name__)


class HostState(StrEnum):
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
# Only ONLINE hosts take new placements (scheduler.service.SCHEDULABLE_HOST_STATES).
TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    H.ONLINE: frozenset(
        {
            H.LOST,  # no heartbeat within the liveness timeout, or RevokeHost
            H.DRAINING,  # DrainHost: no new jobs, running ones finish
        }
    ),
    H.DRAINING: frozenset(
        {
            H.DRAINED,  # no live attempt is left on the host
            H.ONLINE,  # UndrainHost
            H.LOST,  # no heartbeat within the liveness timeout (the drain request is kept),
            # or RevokeHost
        }
    ),
    H.DRAINED: frozenset(
        {
            H.ONLINE,  # UndrainHost
            H.LOST,  # no heartbeat within the liveness timeout (the drain request is kept),
            # or RevokeHost
        }
    ),
    # A revoked host stays LOST: its credential is refused, so it never heartbeats again.
    H.LOST: frozenset(
        {
            H.ONLINE,  # heartbeats again and no drain was requested
            H.DRAINING,  # heartbeats again with a drain requested before or while lost
        }
    ),
}


def can_transition(current: HostState, target: HostState) -> bool:
    return target in TRANSITIONS[current]


def transition(host: Host, target: HostState, why: str) -> bool:
    """Moves `host` to `target` (logged with `why`); False when the edge is not allowed."""
    current = HostState(host.state)
    if current == target or not can_transition(current, target):
        return False
    host.state = target.value
    log.info("host %s: %s → %s (%s)", host.id, current.value, target.value, why)
    return True


def returning_state(host: Host) -> HostState:
    """Where a lost host goes when it heartbeats again: draining if a drain was requested."""
    return H.DRAINING if host.drain_reason else H.ONLINE
