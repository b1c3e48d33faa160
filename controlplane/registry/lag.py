"""How late this process's event loop runs: the time a heartbeat that arrived waited its turn."""

from __future__ import annotations

import asyncio
import time
from collections import deque

# A wake-up later than this is a stall (timer and scheduling noise stay under it).
STALL_THRESHOLD_SECONDS = 0.02


class LoopLag:
    """A task that sleeps `interval` seconds over and over and notes how much later than due it
    woke: anything ready on the loop (a heartbeat read off a Connect stream, a hello, an
    accepted call) waited about as long. Keeps the stalls of the last `window` seconds, so
    that liveness counts only the time this process kept up (`served_cutoff`)."""

    def __init__(self, interval: float = 0.05, window: float = 600.0) -> None:
        self.interval = interval
        self.window = window
        # (monotonic time the ticker woke, seconds it woke late), oldest first.
        self._stalls: deque[tuple[float, float]] = deque()
        # When the ticker is due next (None: not running): a stall still going on.
        self._due: float | None = None
        # The latest wake-up's lateness (seconds), for the metrics.
        self.latest = 0.0

    async def run(self) -> None:
        """Measures until cancelled."""
        try:
            while True:
                self._due = time.monotonic() + self.interval
                await asyncio.sleep(self.interval)
                self.note(time.monotonic(), time.monotonic() - self._due)
        finally:
            self._due = None

    def note(self, woke: float, late: float) -> None:
        """Records one wake-up `late` seconds after it was due (at monotonic `woke`)."""
        self.latest = max(0.0, late)
        if late > STALL_THRESHOLD_SECONDS:
            self._stalls.append((woke, late))
        while self._stalls and self._stalls[0][0] < woke - self.window:
            self._stalls.popleft()

    def largest(self, seconds: float, now: float | None = None) -> float:
        """The longest stall of the last `seconds` (the one going on included). Safe from
        another thread (the metrics server's): it walks a copy."""
        now = time.monotonic() if now is None else now
        stalls = tuple(self._stalls)  # one C call: atomic under the GIL
        return max([self._ongoing(now), *(late for woke, late in stalls if woke >= now - seconds)])

    def stalled_since(self, since: float, now: float | None = None) -> float:
        """Seconds the loop stalled after monotonic `since` (the stall going on included)."""
        now = time.monotonic() if now is None else now
        total = self._ongoing(now)
        for woke, late in reversed(self._stalls):
            if woke <= since:
                break
            total += min(late, woke - since)
        return total

    def served_lookback(self, seconds: float, now: float | None = None) -> float:
        """How far back from `now` the loop has served for `seconds` (wall time minus its
        stalls): a host silent over that span was silent for `seconds` of serving time."""
        now = time.monotonic() if now is None else now
        back = seconds
        for _ in range(20):  # converges in a step or two; bounded all the same
            wanted = seconds + self.stalled_since(now - back, now)
            if wanted <= back + 1e-3:
                break
            back = wanted
        return back

    def _ongoing(self, now: float) -> float:
        due = self._due
        if due is None or now - due <= STALL_THRESHOLD_SECONDS:
            return 0.0
        return now - due
