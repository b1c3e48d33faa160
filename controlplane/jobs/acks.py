"""Daemons' answers to stored commands; "not running here" loses the attempt at once."""

from __future__ import annotations

import logging

from gpuplane.v1 import registry_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.repository import CommandRepository
from controlplane.db.base import utcnow
from controlplane.jobs.lost import LostAttempts
from controlplane.jobs.repository import JobRepository

log = logging.getLogger(__name__)

APPLIED = "applied"
NOT_RUNNING = "not_running"
# Why the attempt was lost, by the kind of command the daemon answered "not running here".
NOT_RUNNING_HERE = {
    "cancel": "its host does not run it (answered a cancel: not running here)",
    "resync": "its host does not run it (its heartbeats did not list it; answered a resync: "
    "not running here)",
}


class CommandAcks(LostAttempts):
    """Part of JobService: CommandAcks arriving on a host's Connect stream."""

    async def acknowledge_command(self, host_id: str, ack: registry_pb2.CommandAck) -> bool:
        """Records a daemon's answer to one of its own host's commands (the first answer
        stands; a foreign or unknown id changes nothing). A cancel, or a resync asking about
        one attempt (`missing`), answered "not running here" loses its attempt at once if it
        is still live on that host: never charged,
        retried by the usual rules (a job whose cancel was asked ends CANCELLED). True when
        an attempt was lost."""
        not_running = ack.answer == registry_pb2.COMMAND_ANSWER_NOT_RUNNING_HERE
        now = utcnow()

        async def work(session: AsyncSession) -> str | None:
            answer = NOT_RUNNING if not_running else APPLIED
            command = await CommandRepository(session).acknowledge(
                host_id, ack.command_id, answer, now
            )
            if command is None or not not_running or command.kind not in NOT_RUNNING_HERE:
                return None
            if command.job_id is None or command.attempt is None:
                return None
            repo = JobRepository(session)
            job = await repo.get(command.job_id, lock=True)
            attempt = await repo.attempt(command.job_id, command.attempt, lock=True)
            if job is None or attempt is None or not attempt.live or attempt.host_id != host_id:
                return None
            why = NOT_RUNNING_HERE[command.kind]
            await self._lose_attempt(session, repo, job, attempt, why, now)
            return job.id

        job_id = await self.db.run(work)
        if job_id is None:
            return False
        log.warning("%s: attempt lost, its host %s does not run it", job_id, host_id)
        self.notifier.job_changed(job_id)
        self.notifier.gpus_changed(freed=True)
        return True
