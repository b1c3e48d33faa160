"""All SQL for hardware verification probes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.models import HostStreamHolder
from controlplane.registry.models import Host
from controlplane.verification.models import HostProbe


class ProbeRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, probe: HostProbe) -> None:
        self.session.add(probe)

    async def flush(self) -> None:
        await self.session.flush()

    async def get(self, probe_id: int, host_id: str, *, lock: bool = False) -> HostProbe | None:
        """The host's probe `probe_id` (None when it is another host's, or none)."""
        query = select(HostProbe).where(HostProbe.id == probe_id, HostProbe.host_id == host_id)
        if lock:
            query = query.with_for_update()
        return (await self.session.scalars(query)).first()

    async def latest_of(self, host_id: str) -> HostProbe | None:
        """The host's latest probe, if any."""
        query = (
            select(HostProbe)
            .where(HostProbe.host_id == host_id)
            .order_by(HostProbe.id.desc())
            .limit(1)
        )
        return (await self.session.scalars(query)).first()

    async def pending_of(self, host_id: str) -> Sequence[HostProbe]:
        """The host's unanswered probes, locked."""
        query = (
            select(HostProbe)
            .where(HostProbe.host_id == host_id, HostProbe.outcome.is_(None))
            .with_for_update()
        )
        return (await self.session.scalars(query)).all()

    async def overdue(self, now: datetime, limit: int = 100) -> Sequence[HostProbe]:
        """Unanswered probes past their deadline, locked (others skip them)."""
        query = (
            select(HostProbe)
            .where(HostProbe.outcome.is_(None), HostProbe.deadline_at < now)
            .order_by(HostProbe.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return (await self.session.scalars(query)).all()

    async def connected_hosts_last_probed(
        self,
    ) -> Sequence[tuple[str, datetime | None, str | None]]:
        """Each host whose daemon holds a Connect stream, not simulated nor revoked, with when
        its latest probe was issued (None: never) and how it ended (None: pending)."""
        latest = (
            select(HostProbe.host_id, func.max(HostProbe.id).label("probe_id"))
            .group_by(HostProbe.host_id)
            .subquery()
        )
        query = (
            select(Host.id, HostProbe.issued_at, HostProbe.outcome)
            .join(HostStreamHolder, HostStreamHolder.host_id == Host.id)
            .outerjoin(latest, latest.c.host_id == Host.id)
            .outerjoin(HostProbe, HostProbe.id == latest.c.probe_id)
            .where(Host.simulated.is_(False), Host.revoked_at.is_(None))
        )
        return [(h, issued, outcome) for h, issued, outcome in await self.session.execute(query)]
