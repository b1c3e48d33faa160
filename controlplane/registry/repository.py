"""All SQL for registration tokens, hosts and GPUs."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Select, Table, bindparam, case, exists, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal, Role
from controlplane.db.base import utcnow
from controlplane.db.prefix import starts_with
from controlplane.jobs.models import JobAttempt
from controlplane.paging import Page, PageRequest, page_by_id
from controlplane.registry import repository_hosts_pg as hosts_pg
from controlplane.registry.models import Gpu, Host, HostEvent, NatsRevocation, RegistrationToken
from controlplane.registry.reliability import ProviderBook, note_outcome

_OUTCOME_COLUMNS = (
    Host.id,
    Host.provider_tenant_id,
    Host.completed_attempts,
    Host.reliability_good,
    Host.reliability_bad,
    Host.reliability_at,
)


@dataclass(slots=True)
class _Outcomes:
    """A locked host's counts (a reliability.Record), changed in memory and written back."""

    id: str
    provider_tenant_id: str
    completed_attempts: int
    reliability_good: float
    reliability_bad: float
    reliability_at: datetime | None


_RECORD_HEARTBEATS_PG = text(
    "UPDATE hosts SET last_heartbeat_at = :when "
    "WHERE id = ANY(CAST(:ids AS varchar[])) AND state != 'lost'"
)


class RegistryRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, row: RegistrationToken | Host | HostEvent | Gpu | NatsRevocation) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    async def token_by_hash(self, secret_hash: str) -> RegistrationToken | None:
        return await self.session.scalar(
            select(RegistrationToken).where(RegistrationToken.secret_hash == secret_hash)
        )

    async def token_by_idempotency_key(
        self, caller_tenant: str, key: str
    ) -> RegistrationToken | None:
        """The token minted with `key` by a caller of `caller_tenant`."""
        return await self.session.scalar(
            select(RegistrationToken).where(
                RegistrationToken.idempotency_tenant_id == caller_tenant,
                RegistrationToken.idempotency_key == key,
            )
        )

    async def get_token(self, token_id: str) -> RegistrationToken | None:
        return await self.session.get(RegistrationToken, token_id)

    @staticmethod
    def readable_tokens(caller: Principal) -> Select[RegistrationToken]:
        """The registration tokens `caller` may see: its tenant's; all for an admin."""
        query = select(RegistrationToken)
        if caller.is_admin:
            return query
        return query.where(RegistrationToken.provider_tenant_id == caller.tenant_id)

    async def get_readable_token(
        self, caller: Principal, token_id: str
    ) -> RegistrationToken | None:
        return await self.session.scalar(
            self.readable_tokens(caller).where(RegistrationToken.id == token_id)
        )

    async def list_tokens(
        self,
        caller: Principal,
        provider: str | None,
        active_after: datetime | None,
        page: PageRequest,
    ) -> Page[RegistrationToken]:
        token = RegistrationToken
        query = self.readable_tokens(caller)
        if provider:
            query = query.where(token.provider_tenant_id == provider)
        if active_after is not None:
            query = query.where(token.revoked_at.is_(None), token.expires_at > active_after)
        return await page_by_id(self.session, query, token.id, page, lambda t: t.id)

    async def consume_token(self, token_id: str) -> bool:
        """Counts one use unless the token is used up (atomic against concurrent registers)."""
        token = RegistrationToken
        result = await self.session.execute(
            update(token)
            .where(token.id == token_id, (token.max_uses == 0) | (token.uses < token.max_uses))
            .values(uses=token.uses + 1)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def revoke_tokens_of(self, provider: str, now: datetime) -> int:
        """Revokes the provider's registration tokens not yet revoked; returns how many."""
        token = RegistrationToken
        result = await self.session.execute(
            update(token)
            .where(token.provider_tenant_id == provider, token.revoked_at.is_(None))
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def hosts_of_provider(self, provider: str, *, lock: bool = False) -> Sequence[Host]:
        """Every host of the provider, in any state, by id."""
        query = select(Host).where(Host.provider_tenant_id == provider).order_by(Host.id)
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return (await self.session.scalars(query)).all()

    async def host_by_machine(self, provider: str, machine_id: str) -> Host | None:
        return await self.session.scalar(
            select(Host).where(Host.provider_tenant_id == provider, Host.machine_id == machine_id)
        )

    async def host_by_credential(self, credential_hash: str) -> Host | None:
        return await self.session.scalar(
            select(Host).where(Host.credential_hash == credential_hash)
        )

    async def get_host(self, host_id: str, *, lock: bool = False) -> Host | None:
        """The host; `lock`: locked, and reread even if this session holds it already (its
        counters are read-modify-written by concurrent reports)."""
        return await self.session.get(Host, host_id, with_for_update=lock, populate_existing=lock)

    async def hosts_by_id(self, host_ids: Sequence[str]) -> dict[str, Host]:
        """The hosts of these ids that exist, by id."""
        rows = await self.session.scalars(select(Host).where(Host.id.in_(list(host_ids))))
        return {host.id: host for host in rows.all()}

    async def hosts_in_states(self, states: Sequence[str]) -> Sequence[Host]:
        """Hosts in `states`, cheapest first, then by id."""
        return (
            await self.session.scalars(
                select(Host)
                .where(Host.state.in_(states))
                .order_by(Host.price_per_gpu_hour, Host.id)
            )
        ).all()

    @staticmethod
    def readable_hosts(caller: Principal) -> Select[Host]:
        """The hosts `caller` may see: a provider its own, a host itself, an admin all."""
        query = select(Host)
        if caller.is_admin:
            return query
        if caller.role is Role.HOST:
            return query.where(Host.id == caller.principal_id)
        return query.where(Host.provider_tenant_id == caller.tenant_id)

    async def get_readable_host(
        self, caller: Principal, host_id: str, *, lock: bool = False
    ) -> Host | None:
        """The host if `caller` may see it (a foreign host is as absent as a missing one)."""
        query = self.readable_hosts(caller).where(Host.id == host_id)
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def list_hosts(
        self,
        caller: Principal,
        states: Sequence[str],
        provider: str | None,
        page: PageRequest,
        id_prefix: str = "",
    ) -> Page[Host]:
        query = self.readable_hosts(caller)
        if id_prefix:
            query = query.where(starts_with(Host.id, id_prefix))
        if states:
            query = query.where(Host.state.in_(states))
        if provider:
            query = query.where(Host.provider_tenant_id == provider)
        return await page_by_id(self.session, query, Host.id, page, lambda h: h.id)

    async def provider_book(self, providers: Iterable[str], now: datetime) -> ProviderBook:
        """The outcomes of every host (revoked and lost ones too) of `providers`, by provider:
        what a host's reliability is scored over. Hosts without any outcome add nothing and
        are not read (a fleet of fresh hosts registering costs no scan of its provider's)."""
        wanted = sorted(set(providers))
        if not wanted:
            return ProviderBook((), now)
        rows = await self.session.execute(
            select(
                Host.provider_tenant_id,
                Host.reliability_good,
                Host.reliability_bad,
                Host.reliability_at,
            ).where(
                Host.provider_tenant_id.in_(wanted),
                (Host.reliability_good != 0) | (Host.reliability_bad != 0),
            )
        )
        return ProviderBook(rows.all(), now)

    async def score(self, hosts: Sequence[Host], now: datetime) -> Sequence[Host]:
        """Sets each host's `reliability` (its outcomes over its provider's); returns them."""
        book = await self.provider_book((h.provider_tenant_id for h in hosts), now)
        for host in hosts:
            host.reliability = book.host_permille(host)
        return hosts

    async def host_events(self, host_id: str, limit: int = 500) -> Sequence[HostEvent]:
        """The host's state changes, oldest first."""
        query = (
            select(HostEvent)
            .where(HostEvent.host_id == host_id)
            .order_by(HostEvent.id)
            .limit(limit)
        )
        return (await self.session.scalars(query)).all()

    async def gpus_of(self, host_ids: Sequence[str]) -> Sequence[Gpu]:
        if not host_ids:
            return []
        return (
            await self.session.scalars(
                select(Gpu).where(Gpu.host_id.in_(host_ids)).order_by(Gpu.host_id, Gpu.index)
            )
        ).all()

    async def gpus_by_uuid(self, uuids: Sequence[str]) -> Sequence[Gpu]:
        return (await self.session.scalars(select(Gpu).where(Gpu.uuid.in_(uuids)))).all()

    async def heartbeat(self, host_id: str, when: datetime) -> None:
        await self.session.execute(
            update(Host).where(Host.id == host_id).values(last_heartbeat_at=when)
        )

    async def count_gpu_fault(self, host_id: str) -> None:
        """A GPU of the host went unhealthy: one fault, and one bad outcome for reliability."""
        host = await self.session.get(Host, host_id, with_for_update=True)
        if host is not None:
            host.gpu_faults += 1
            note_outcome(host, False, utcnow())

    async def set_gpu_health(
        self, uuid: str, host_id: str, healthy: bool, reason: str
    ) -> str | None:
        """Sets a GPU's health; returns the job on it ("" for none), None when the GPU is not
        (or no longer) this host's."""
        gpu = await self.session.get(Gpu, uuid, with_for_update=True)
        if gpu is None or gpu.host_id != host_id:
            return None
        if gpu.healthy and not healthy:
            await self.count_gpu_fault(host_id)
        gpu.healthy = healthy
        gpu.unhealthy_reason = "" if healthy else reason[:500]
        return gpu.job_id or ""

    async def allocated_gpus(self) -> Sequence[tuple[str, str, int]]:
        """(uuid, job id, attempt) of every GPU held by a live attempt."""
        rows = await self.session.execute(
            select(Gpu.uuid, Gpu.job_id, Gpu.attempt).where(Gpu.job_id.is_not(None))
        )
        return [(uuid, job_id, attempt or 0) for uuid, job_id, attempt in rows if job_id]

    async def has_live_attempts(self, host_id: str) -> bool:
        return bool(
            await self.session.scalar(
                select(exists().where(JobAttempt.host_id == host_id, JobAttempt.live.is_(True)))
            )
        )

    async def idle_draining_hosts(self, *, lock: bool = True) -> Sequence[Host]:
        """Draining hosts with no live attempt left (locked, skipping rows others hold)."""
        live = exists().where(JobAttempt.host_id == Host.id, JobAttempt.live.is_(True))
        query = select(Host).where(Host.state == "draining", ~live)
        if lock:
            query = query.with_for_update(skip_locked=True)
        return (await self.session.scalars(query)).all()

    async def record_heartbeats(self, host_ids: Iterable[str], when: datetime) -> int:
        """Sets last_heartbeat_at of those hosts that are not lost; returns how many."""
        if self.session.get_bind().dialect.name == "postgresql":
            # One array parameter: an IN list of thousands of ids (a fleet's heartbeats each
            # second) cost more to render than the update itself.
            params = {"ids": list(host_ids), "when": when}
            result = await self.session.execute(_RECORD_HEARTBEATS_PG, params)
            return int(result.rowcount)  # type: ignore[attr-defined]
        result = await self.session.execute(
            update(Host)
            .where(Host.id.in_(list(host_ids)), Host.state != "lost")
            .values(last_heartbeat_at=when)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def not_up_among(self, host_ids: Iterable[str]) -> set[str]:
        """Those of `host_ids` that are lost or no longer exist."""
        ids = set(host_ids)
        rows = await self.session.scalars(
            select(Host.id).where(Host.id.in_(list(ids)), Host.state != "lost")
        )
        return ids - set(rows)

    async def stale_online_hosts(self, cutoff: datetime) -> Sequence[Host]:
        return (
            await self.session.scalars(
                select(Host)
                .where(
                    Host.state.in_(("online", "draining", "drained")),
                    (Host.last_heartbeat_at.is_(None)) | (Host.last_heartbeat_at < cutoff),
                )
                .with_for_update(skip_locked=True)
            )
        ).all()

    async def allocate_gpus(self, uuids: Sequence[str], job_id: str, attempt: int) -> int:
        """Gives free GPUs to an attempt; returns how many were free (all or the caller aborts)."""
        result = await self.session.execute(
            update(Gpu)
            .where(Gpu.uuid.in_(uuids), Gpu.job_id.is_(None))
            .values(job_id=job_id, attempt=attempt)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def count_completed_attempts(self, counts: Mapping[str, int]) -> dict[str, str]:
        """Adds `counts` (host id → attempts completed) to the hosts' counts in the database
        (concurrent reports each add theirs): one UPDATE for all of them, after locking them
        in id order when there are several; the providers of the hosts that exist. A Host
        loaded in this session keeps its earlier count."""
        ids = sorted(counts)
        if not ids:
            return {}
        if len(ids) > 1:
            locked = select(Host.id).where(Host.id.in_(ids)).order_by(Host.id).with_for_update()
            await self.session.execute(locked)
        added = case(dict(counts), value=Host.id, else_=0)
        query = (
            update(Host)
            .where(Host.id.in_(ids))
            .values(completed_attempts=Host.completed_attempts + added)
            .returning(Host.id, Host.provider_tenant_id)
            .execution_options(synchronize_session=False)
        )
        return {host_id: provider for host_id, provider in await self.session.execute(query)}

    async def note_outcomes(self, outcomes: Sequence[tuple[str, bool]], now: datetime) -> None:
        """Counts each (host id, completed?) in its host's reliability record
        (registry/reliability.note_outcome), the hosts locked in id order first: the decayed
        counts are read and written back, so concurrent reports must not interleave."""
        await self.end_attempts({}, outcomes, now)

    async def end_attempts(
        self,
        completed: Mapping[str, int],
        outcomes: Sequence[tuple[str, bool]],
        now: datetime,
        release: Collection[tuple[str, int]] = (),
    ) -> dict[str, str]:
        """Frees the GPUs of the attempts `release` names (job id, attempt), adds `completed`
        (host id → attempts completed) to the hosts' counts and each (host id, completed?) of
        `outcomes` to its host's reliability record (reliability.note_outcome): the hosts
        locked in id order and read in one statement, written back in one, whatever the
        batch (on PostgreSQL the GPUs' statement travels with the hosts' lock); the providers
        of the hosts that exist. Rows, not ORM objects: a Host loaded in this session keeps
        its values."""
        ids = sorted({*completed, *(host_id for host_id, _ in outcomes)})
        if not ids and not release:
            return {}
        postgres = self.session.get_bind().dialect.name == "postgresql"
        if postgres:
            rows = await hosts_pg.release_and_lock(self.session, release, ids)
        else:
            if release:
                await self.release_gpus_of(release)
            query = select(*_OUTCOME_COLUMNS).where(Host.id.in_(ids)).order_by(Host.id)
            rows = [list(row) for row in await self.session.execute(query.with_for_update())]
        hosts = {row[0]: _Outcomes(*row) for row in rows}
        for host_id, ok in outcomes:
            if (host := hosts.get(host_id)) is not None:
                note_outcome(host, ok, now)
        written = [
            (
                h.id,
                h.completed_attempts + completed.get(h.id, 0),
                h.reliability_good,
                h.reliability_bad,
                h.reliability_at,
            )
            for h in hosts.values()
        ]
        if written and postgres:
            await hosts_pg.write_hosts(self.session, written)
        elif written:
            names = ("b_id", *(c.name for c in _OUTCOME_COLUMNS[2:]))
            table = cast(Table, Host.__table__)
            connection = await self.session.connection()
            await connection.execute(
                update(table).where(table.c.id == bindparam("b_id")),
                [dict(zip(names, row, strict=True)) for row in written],
            )
        return {host.id: host.provider_tenant_id for host in hosts.values()}

    async def count_completed_attempt(self, host_id: str) -> str | None:
        """One more attempt completed on the host (count_completed_attempts); its provider."""
        return (await self.count_completed_attempts({host_id: 1})).get(host_id)

    async def release_gpus_of(self, attempts: Collection[tuple[str, int]]) -> None:
        """Frees the GPUs of the attempts named (job id, attempt), in one statement."""
        await self.session.execute(
            update(Gpu)
            .where(tuple_(Gpu.job_id, Gpu.attempt).in_(attempts))
            .values(job_id=None, attempt=None)
            .execution_options(synchronize_session=False)
        )

    async def release_gpus(self, job_id: str, attempt: int) -> None:
        await self.session.execute(
            update(Gpu)
            .where(Gpu.job_id == job_id, Gpu.attempt == attempt)
            .values(job_id=None, attempt=None)
        )

    async def revoke_nats_user(self, public_key: str, host_id: str, when: datetime) -> None:
        """Adds a user key to the account's revocations (once; the first time stays)."""
        if await self.session.get(NatsRevocation, public_key) is None:
            row = NatsRevocation(public_key=public_key, host_id=host_id, revoked_at=when)
            self.session.add(row)

    async def nats_revocations(self) -> Sequence[tuple[str, datetime]]:
        rows = await self.session.execute(
            select(NatsRevocation.public_key, NatsRevocation.revoked_at).order_by(
                NatsRevocation.public_key
            )
        )
        return [(key, when) for key, when in rows]
