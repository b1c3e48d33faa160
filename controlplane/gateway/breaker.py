"""A per-replica circuit breaker: open after consecutive failures, half-open after a pause."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

Clock = Callable[[], float]
FAILURES_TO_OPEN = 3
OPEN_SECONDS = 15.0


class Circuit(StrEnum):
    CLOSED = "closed"  # requests flow
    OPEN = "open"  # no request until OPEN_SECONDS have passed
    HALF_OPEN = "half_open"  # one trial request at a time decides


class Breaker:
    """Closed: requests flow; `FAILURES_TO_OPEN` failures in a row open it. Open: no request
    for `OPEN_SECONDS`, then half-open. Half-open: one trial request at a time; its success
    closes the circuit, its failure opens it again for another pause. `clock` is monotonic
    seconds (a fake one in tests)."""

    def __init__(
        self,
        clock: Clock = time.monotonic,
        failures_to_open: int = FAILURES_TO_OPEN,
        open_seconds: float = OPEN_SECONDS,
    ) -> None:
        self.clock = clock
        self.failures_to_open = failures_to_open
        self.open_seconds = open_seconds
        self._circuit = Circuit.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False

    @property
    def circuit(self) -> Circuit:
        """The circuit as of now (an open one whose pause is over reads half-open)."""
        if self._circuit is Circuit.OPEN and self.clock() - self._opened_at >= self.open_seconds:
            self._circuit, self._trial = Circuit.HALF_OPEN, False
        return self._circuit

    def available(self) -> bool:
        """Whether a request may be sent now (without taking the half-open trial)."""
        circuit = self.circuit
        return circuit is Circuit.CLOSED or (circuit is Circuit.HALF_OPEN and not self._trial)

    def acquire(self) -> bool:
        """Takes the right to send one request: always when closed, the one trial when
        half-open, never when open."""
        if not self.available():
            return False
        if self._circuit is Circuit.HALF_OPEN:
            self._trial = True
        return True

    def success(self) -> None:
        self._circuit, self._failures, self._trial = Circuit.CLOSED, 0, False

    def failure(self) -> None:
        self._failures += 1
        if self._circuit is Circuit.HALF_OPEN or self._failures >= self.failures_to_open:
            self._circuit, self._opened_at, self._trial = Circuit.OPEN, self.clock(), False
