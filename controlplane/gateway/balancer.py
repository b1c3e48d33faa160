"""Which ready replica of a service takes the next request: round-robin or least outstanding."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from controlplane.gateway.breaker import Breaker, Clock


class Strategy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING = "least_outstanding"


@dataclass
class Replica:
    replica_id: str
    breaker: Breaker
    # Requests sent to it and not answered yet.
    outstanding: int = 0


@dataclass
class Choice:
    """The replica chosen (None: none can take the request, and `reason` says why)."""

    replica: Replica | None
    reason: str = ""


@dataclass
class ServicePool:
    """The ready replicas of one service as the routing table has them, each with its own
    circuit breaker (kept across updates while the replica stays ready)."""

    clock: Clock = time.monotonic
    strategy: Strategy = Strategy.ROUND_ROBIN
    service_id: str = ""
    replicas: dict[str, Replica] = field(default_factory=dict)
    _next: int = 0

    def update(self, ready: Iterable[str]) -> None:
        """The replicas ready now: new ones start closed; gone ones are forgotten."""
        wanted = sorted(set(ready))
        self.replicas = {
            rid: self.replicas.get(rid) or Replica(rid, Breaker(self.clock)) for rid in wanted
        }

    def choose(self, avoid: Collection[str] = ()) -> Choice:
        """A replica for the next request (`avoid`: the ones a retry already tried), its
        breaker's right to send taken; release() it with the outcome."""
        if not self.replicas:
            return Choice(None, "no replica is ready")
        candidates = [
            r for r in self.replicas.values() if r.replica_id not in avoid and r.breaker.available()
        ]
        if not candidates:
            why = "every ready replica's circuit is open"
            return Choice(None, why if not avoid else f"{why} or was tried already")
        if self.strategy is Strategy.LEAST_OUTSTANDING:
            chosen = min(candidates, key=lambda r: (r.outstanding, r.replica_id))
        else:
            chosen = candidates[self._next % len(candidates)]
            self._next += 1
        chosen.breaker.acquire()
        chosen.outstanding += 1
        return Choice(chosen)

    def release(self, replica: Replica, ok: bool) -> None:
        """The answer came (`ok`), or the request failed (connection, 5xx from a dead end)."""
        replica.outstanding = max(replica.outstanding - 1, 0)
        if ok:
            replica.breaker.success()
        else:
            replica.breaker.failure()
