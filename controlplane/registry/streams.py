"""Connect streams open on this control-plane process, and the queues commands reach daemons by
(commands themselves are stored and delivered by controlplane/commands)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from gpuplane.v1 import registry_pb2


@dataclass
class HostStream:
    """One connected daemon: the queue its Connect stream drains into ControlMessages."""

    host_id: str
    commands: asyncio.Queue[registry_pb2.ControlMessage] = field(default_factory=asyncio.Queue)
    # Set by RevokeHost: the Connect stream ends with UNAUTHENTICATED.
    revoked: asyncio.Event = field(default_factory=asyncio.Event)


class HostStreams:
    """Daemons connected to this control-plane process, for sending them commands."""

    def __init__(self) -> None:
        self._streams: dict[str, HostStream] = {}
        # Set when a command was stored here: this process's delivery loop looks at once
        # (other replicas' loops find it at their next poll).
        self.pending = asyncio.Event()
        # Tells the other replicas a command was stored (set while NATS is connected).
        self.announce: Callable[[str], None] | None = None
        # Set as this process stops: every Connect stream ends (its daemon reconnects, to
        # another replica if there is one) instead of holding the server's grace period.
        self.closing = asyncio.Event()

    def wake(self, host_id: str) -> None:
        """A command for `host_id` was stored (and committed) by this process: its delivery
        loop looks at once if the host is connected here, and the other replicas are told
        (the host's latest stream may be on one of them even then)."""
        if self.connected(host_id):
            self.pending.set()
        if self.announce is not None:
            self.announce(host_id)

    def woken(self, host_id: str) -> None:
        """Another replica stored a command for `host_id`."""
        if self.connected(host_id):
            self.pending.set()

    def open(self, host_id: str) -> HostStream:
        stream = HostStream(host_id)
        self._streams[host_id] = stream
        return stream

    def close(self, stream: HostStream) -> bool:
        """Forgets `stream`; False when a newer stream of its host replaced it here."""
        if self._streams.get(stream.host_id) is stream:
            del self._streams[stream.host_id]
            return True
        return False

    def send(self, host_id: str, message: registry_pb2.ControlMessage) -> bool:
        stream = self._streams.get(host_id)
        if stream is None:
            return False
        stream.commands.put_nowait(message)
        return True

    def revoke(self, host_id: str) -> bool:
        """Ends the host's Connect stream on this process (its credential was revoked)."""
        stream = self._streams.get(host_id)
        if stream is None:
            return False
        stream.revoked.set()
        return True

    def connected(self, host_id: str) -> bool:
        return host_id in self._streams
