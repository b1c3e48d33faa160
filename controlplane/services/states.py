"""The service state machine: its table, its only setter and its history (service_events)."""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from gpuplane.v1 import services_pb2

from controlplane.services.models import Service, ServiceEvent
from controlplane.statemachine import StateMachine, register

log = logging.getLogger(__name__)


class ServiceState(StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"
    DELETED = "deleted"

    @property
    def pb(self) -> services_pb2.ServiceState.ValueType:
        return services_pb2.ServiceState.Value(f"SERVICE_STATE_{self.name}")


S = ServiceState
SERVICE = register(
    StateMachine(
        "service",
        ServiceState,
        S.ACTIVE,
        {
            S.ACTIVE: {
                S.STOPPED: "StopService, or its owner's credit cannot pay for its replicas",
                S.DELETED: "DeleteService",
            },
            S.STOPPED: {
                S.ACTIVE: "StartService",
                S.DELETED: "DeleteService",
            },
            S.DELETED: {},
        },
    )
)


class Adder(Protocol):
    """Where the history rows go (a ServiceRepository)."""

    def add(self, row: Service | ServiceEvent) -> None: ...


def new_service(events: Adder, service: Service, now: datetime) -> Service:
    """Adds `service`, ACTIVE, its first state recorded through the setter's path."""
    events.add(service)
    _enter(events, service, SERVICE.initial, "DeployService", now)
    return service


def set_service_state(
    events: Adder, service: Service, target: ServiceState, why: str, now: datetime
) -> bool:
    """The service's only setter: moves it to `target` and records why in service_events;
    False (nothing changed) when it is already there or the edge is not in the table. A
    deleted service's name is free again (live_name cleared)."""
    current = ServiceState(service.state)
    if not SERVICE.check(current, target):
        return False
    _enter(events, service, target, why, now)
    if target is S.DELETED:
        service.live_name = None
    log.info("service %s: %s → %s (%s)", service.id, current.value, target.value, why)
    return True


def note_service_event(events: Adder, service: Service, why: str, now: datetime) -> None:
    """Records what happened to the service (a replica replaced, a warning) in its history,
    its state unchanged."""
    events.add(
        ServiceEvent(service_id=service.id, state=service.state, reason=why[:1000], time=now)
    )
    service.updated_at = now


def _enter(events: Adder, service: Service, target: ServiceState, why: str, now: datetime) -> None:
    service.state = target.value
    service.state_reason = why[:1000]
    service.updated_at = now
    events.add(ServiceEvent(service_id=service.id, state=target.value, reason=why[:1000], time=now))
