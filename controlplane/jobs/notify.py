"""In-process wake-ups: job watchers, the scheduler and the outbox relay wait on these."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable


class Notifier:
    """Wakes waiters in this process. Other replicas' changes are seen by polling (each wait
    has a timeout), so a missed wake-up costs latency, never correctness."""

    def __init__(self) -> None:
        self._jobs: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self.schedule = asyncio.Event()
        self.outbox = asyncio.Event()
        # Told every job id that changed here (the gateway's routes follow replicas' jobs).
        self.listeners: list[Callable[[str], None]] = []
        # Told when GPUs were taken or freed here (the market view quotes show).
        self.capacity_listeners: list[Callable[[], None]] = []

    def gpus_changed(self, *, freed: bool) -> None:
        """GPUs were taken (a placement) or freed (an attempt ended) here: views of free GPUs
        are read again; freed ones wake the scheduler."""
        for listener in self.capacity_listeners:
            listener()
        if freed:
            self.schedule.set()

    def job_changed(self, job_id: str) -> None:
        self.wake_watchers(job_id)
        for listener in self.listeners:
            listener(job_id)

    def wake_watchers(self, job_id: str) -> None:
        """Wakes whoever waits on `job_id` here (not the listeners)."""
        for event in self._jobs.get(job_id, ()):
            event.set()

    async def wait_job(self, job_id: str, timeout: float) -> None:
        event = asyncio.Event()
        self._jobs[job_id].add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._jobs.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._jobs[job_id]
