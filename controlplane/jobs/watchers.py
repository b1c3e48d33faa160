"""WatchJob's wait for a job's next event: one poll a second for all of a process's watchers."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from controlplane.db.engine import Database
from controlplane.jobs.notify import Notifier
from controlplane.jobs.repository import JobRepository

log = logging.getLogger(__name__)
# Job ids asked about per statement (well under SQLite's and PostgreSQL's parameter limits).
_CHUNK = 500


class JobWatchers:
    """Watchers of jobs in this process wait here for the job's next event. Changes made in
    this process wake them at once (Notifier.job_changed); another replica's are found by
    one query every `interval` seconds over every job watched here (its event_seq against
    the seq each watcher has seen), not by each watcher rereading its job and events every
    second: 200 watched jobs cost one statement a second, not 400."""

    def __init__(self, db: Database, notifier: Notifier, interval: float = 1.0) -> None:
        self.db = db
        self.notifier = notifier
        self.interval = interval
        # job id -> the seq each of its watchers here has seen.
        self._seen: defaultdict[str, list[int]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None

    async def wait(self, job_id: str, seq: int, timeout: float = 30.0) -> None:
        """Returns once job `job_id` may have an event after `seq` (or after `timeout`)."""
        self._seen[job_id].append(seq)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._poll(), name="job-watchers")
        try:
            await self.notifier.wait_job(job_id, timeout)
        finally:
            seen = self._seen.get(job_id)
            if seen is not None:
                seen.remove(seq)
                if not seen:
                    del self._seen[job_id]

    async def _poll(self) -> None:
        """Wakes the watchers of jobs whose event_seq moved past what they have seen (or
        that are gone), every `interval` seconds while anyone watches."""
        while self._seen:
            await asyncio.sleep(self.interval)
            wanted = {job_id: min(seen) for job_id, seen in self._seen.items() if seen}
            ids = list(wanted)
            try:
                current: dict[str, int] = {}
                for start in range(0, len(ids), _CHUNK):
                    current |= await self._event_seqs(ids[start : start + _CHUNK])
            except Exception:  # noqa: BLE001 - the next round tries again
                log.warning("reading watched jobs' event seqs failed", exc_info=True)
                continue
            for job_id, seen in wanted.items():
                if current.get(job_id, seen + 1) > seen:
                    self.notifier.wake_watchers(job_id)

    async def _event_seqs(self, job_ids: list[str]) -> dict[str, int]:
        async with self.db.read() as session:
            return await JobRepository(session).event_seqs(job_ids)
