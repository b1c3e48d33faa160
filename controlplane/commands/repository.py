"""All SQL for host commands and for which replica holds each host's Connect stream."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from gpuplane.v1 import registry_pb2
from sqlalchemy import Select, delete, exists, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.models import HostCommand, HostStreamHolder
from controlplane.jobs.models import JobAttempt

# A command's answers besides the daemon's own (applied, not_running).
SUPERSEDED = "superseded"
MOOT = "moot"
# Kinds of command that may be about one attempt (job_id, attempt): moot once it ended.
ABOUT_ATTEMPTS = ("cancel", "resync", "extend")


class CommandRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def issue(
        self,
        host_id: str,
        message: registry_pb2.ControlMessage,
        now: datetime,
        *,
        job_id: str | None = None,
        attempt: int | None = None,
    ) -> None:
        """Stores a command for the host, due at once, in the caller's transaction. A drain, or
        a resync about no attempt, closes the host's unacknowledged earlier ones of its kind
        (only the latest matters), and so does a session's extend its attempt's earlier ones
        (each names the whole new duration); a cancel or resync already waiting for the same
        attempt is not stored twice."""
        kind = message.WhichOneof("msg") or ""
        unacked = (HostCommand.host_id == host_id, HostCommand.acked_at.is_(None))
        if kind in ("drain", "extend") or (kind == "resync" and job_id is None):
            about = (HostCommand.job_id == job_id, HostCommand.attempt == attempt)
            await self.session.execute(
                update(HostCommand)
                .where(
                    *unacked,
                    HostCommand.kind == kind,
                    *(about if kind == "extend" else (HostCommand.job_id.is_(None),)),
                )
                .values(acked_at=now, answer=SUPERSEDED)
                .execution_options(synchronize_session=False)
            )
        elif job_id is not None:
            waiting = await self.session.scalar(
                select(HostCommand.id)
                .where(
                    *unacked,
                    HostCommand.kind == kind,
                    HostCommand.job_id == job_id,
                    HostCommand.attempt == attempt,
                )
                .limit(1)
            )
            if waiting is not None:
                return
        self.session.add(
            HostCommand(
                host_id=host_id,
                kind=kind,
                job_id=job_id,
                attempt=attempt,
                payload=message.SerializeToString(),
                created_at=now,
                due_at=now,
                deliveries=0,
            )
        )

    async def hold_streams(self, host_ids: Sequence[str], replica: str, now: datetime) -> None:
        """Records that `replica` holds these hosts' (latest) Connect streams."""
        ids = sorted(set(host_ids))  # locked in one order: replicas opening alike never deadlock
        query = (
            select(HostStreamHolder)
            .where(HostStreamHolder.host_id.in_(ids))
            .order_by(HostStreamHolder.host_id)
            .with_for_update()
        )
        held = {h.host_id: h for h in (await self.session.scalars(query)).all()}
        for host_id in ids:
            holder = held.get(host_id)
            if holder is None:
                self.session.add(HostStreamHolder(host_id=host_id, replica=replica, opened_at=now))
            else:
                holder.replica = replica
                holder.opened_at = now

    async def release_streams(self, host_ids: Iterable[str], replica: str) -> None:
        """Forgets the holders, except where another replica holds a newer stream of a host."""
        await self.session.execute(
            delete(HostStreamHolder).where(
                HostStreamHolder.host_id.in_(list(host_ids)), HostStreamHolder.replica == replica
            )
        )

    async def any_due(self, replica: str, now: datetime) -> bool:
        """Whether a command waits for a host whose stream `replica` holds (a plain read)."""
        query = self._due(replica, now).with_only_columns(HostCommand.id).limit(1)
        found = await self.session.scalar(query)
        return found is not None

    async def due(self, replica: str, now: datetime, limit: int) -> Sequence[HostCommand]:
        """Unacknowledged commands due by `now` for the hosts whose stream `replica` holds,
        oldest first, locked for this delivery."""
        query = self._due(replica, now).limit(limit).with_for_update(of=HostCommand)
        return (await self.session.scalars(query)).all()

    @staticmethod
    def _due(replica: str, now: datetime) -> Select[HostCommand]:
        return (
            select(HostCommand)
            .join(HostStreamHolder, HostStreamHolder.host_id == HostCommand.host_id)
            .where(
                HostStreamHolder.replica == replica,
                HostCommand.acked_at.is_(None),
                HostCommand.due_at <= now,
            )
            .order_by(HostCommand.id)
        )

    async def unacked_of(self, host_ids: Sequence[str]) -> Sequence[HostCommand]:
        """Every unacknowledged command of these hosts, oldest first, locked for delivery."""
        query = (
            select(HostCommand)
            .where(HostCommand.host_id.in_(list(host_ids)), HostCommand.acked_at.is_(None))
            .order_by(HostCommand.id)
            .with_for_update()
        )
        return (await self.session.scalars(query)).all()

    async def live_among(self, attempts: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of these (job, attempt) pairs are still live attempts."""
        if not attempts:
            return set()
        rows = await self.session.execute(
            select(JobAttempt.job_id, JobAttempt.attempt).where(
                tuple_(JobAttempt.job_id, JobAttempt.attempt).in_(attempts), JobAttempt.live
            )
        )
        return {(job_id, attempt) for job_id, attempt in rows}

    async def close_moot(self, now: datetime) -> int:
        """Closes the unacknowledged cancels (and resyncs about one attempt) whose attempt is
        no longer live (ended, or lost
        with its host, which may never connect again to have them closed on delivery);
        returns how many."""
        live = exists().where(
            JobAttempt.job_id == HostCommand.job_id,
            JobAttempt.attempt == HostCommand.attempt,
            JobAttempt.live,
        )
        result = await self.session.execute(
            update(HostCommand)
            .where(
                HostCommand.acked_at.is_(None),
                HostCommand.kind.in_(ABOUT_ATTEMPTS),
                HostCommand.job_id.is_not(None),
                ~live,
            )
            .values(acked_at=now, answer=MOOT)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def expire(self, kind: str, before: datetime, now: datetime) -> int:
        """Closes the unacknowledged commands of `kind` stored before `before` as moot."""
        result = await self.session.execute(
            update(HostCommand)
            .where(
                HostCommand.acked_at.is_(None),
                HostCommand.kind == kind,
                HostCommand.created_at < before,
            )
            .values(acked_at=now, answer=MOOT)
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)

    async def close_host(self, host_id: str, now: datetime) -> None:
        """Closes every unacknowledged command of a host that will never connect again."""
        await self.session.execute(
            update(HostCommand)
            .where(HostCommand.host_id == host_id, HostCommand.acked_at.is_(None))
            .values(acked_at=now, answer=MOOT)
            .execution_options(synchronize_session=False)
        )

    async def acknowledge(
        self, host_id: str, command_id: int, answer: str, now: datetime
    ) -> HostCommand | None:
        """Records the daemon's answer to one of its host's commands (the first answer
        stands); None when the host has no such command."""
        command = await self.session.scalar(
            select(HostCommand)
            .where(HostCommand.id == command_id, HostCommand.host_id == host_id)
            .with_for_update()
        )
        if command is not None and command.acked_at is None:
            command.acked_at = now
            command.answer = answer
        return command
