"""Daemons connected to this control-plane process, and the queues commands reach them by."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gpuplane.v1 import registry_pb2


@dataclass
class HostSession:
    """One connected daemon: the queue its Connect stream drains into ControlMessages."""

    host_id: str
    outbox: asyncio.Queue[registry_pb2.ControlMessage] = field(default_factory=asyncio.Queue)
    # Set by RevokeHost: the Connect stream ends with UNAUTHENTICATED.
    revoked: asyncio.Event = field(default_factory=asyncio.Event)


class HostSessions:
    """Daemons connected to this control-plane process, for sending them commands."""

    def __init__(self) -> None:
        self._sessions: dict[str, HostSession] = {}

    def open(self, host_id: str) -> HostSession:
        session = HostSession(host_id)
        self._sessions[host_id] = session
        return session

    def close(self, session: HostSession) -> None:
        if self._sessions.get(session.host_id) is session:
            del self._sessions[session.host_id]

    def send(self, host_id: str, message: registry_pb2.ControlMessage) -> bool:
        session = self._sessions.get(host_id)
        if session is None:
            return False
        session.outbox.put_nowait(message)
        return True

    def revoke(self, host_id: str) -> bool:
        """Ends the host's Connect stream on this process (its credential was revoked)."""
        session = self._sessions.get(host_id)
        if session is None:
            return False
        session.revoked.set()
        return True

    def connected(self, host_id: str) -> bool:
        return host_id in self._sessions
