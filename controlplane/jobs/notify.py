"""In-process wake-ups: job watchers, the scheduler and the outbox relay wait on these."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class Notifier:
    """Wakes waiters in this process. Other replicas' changes are seen by polling (each wait
    has a timeout), so a missed wake-up costs latency, never correctness."""

    def __init__(self) -> None:
        self._jobs: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self.schedule = asyncio.Event()
        self.outbox = asyncio.Event()

    def job_changed(self, job_id: str) -> None:
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
