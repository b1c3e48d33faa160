"""Liveness: heartbeats heard, written in batches, and hosts declared lost only after `timeout`
of serving time without one (never because this process's loop ran late)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import NotFound, Unauthenticated
from controlplane.ledger.batch import GroupCommit
from controlplane.registry.lag import LoopLag
from controlplane.registry.models import Gpu, Host
from controlplane.registry.monitor import GpuMonitor
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.states import HostState, hello_state, returning_state, set_host_state

REVOKED = "host credential: the host has been revoked"
# A recorded sign of life: the host, and on a hello its GPUs.
Signed = tuple[Host, Sequence[Gpu]]
# Signs of life written per transaction at most.
MAX_SIGNS_BATCH = 1000


class Liveness:
    """Part of RegistryService: signs of life and the loss check."""

    db: Database
    monitor: GpuMonitor | None
    heartbeat_write_interval: float
    _up: set[str]
    _heard: set[str]
    # Hosts whose sign of life this process is serving now (a hello read or being recorded,
    # a returning host's heartbeat waiting for the database), with when it began (monotonic).
    _pending: dict[str, tuple[int, float]]
    # Hosts registered here whose daemon's Connect has not said hello yet, with when (its
    # Connect may queue behind a reconnect storm: the timeout counts from the hello).
    _registered: dict[str, float]
    loop_lag: LoopLag

    # Signs of life, by (host, whether a hello), recorded together: those arriving while a
    # batch is written go in the next one (one transaction each, one at a time).
    _signs: GroupCommit[tuple[str, bool], Signed]

    async def _record_heartbeat(
        self, host_id: str, *, hello: bool = False
    ) -> tuple[Host, Sequence[Gpu]]:
        """Records a sign of life; a lost host is back, and a REGISTERED one is admitted on its
        daemon's hello (states.hello_state: the verification gate), never on anything else.
        Returns the host and, on a hello, its GPUs (read in the same transaction). Those
        arriving together (a fleet reconnecting) are written in one transaction (GroupCommit:
        what arrives while one is written goes in the next)."""
        return await self._signs((host_id, hello))

    async def _record_batch(self, keys: Sequence[tuple[str, bool]]) -> list[Signed | Exception]:
        """GroupCommit's batch: the signs of life `keys` in one transaction, each answered
        with its host and GPUs or why it was refused."""
        outcomes, gpus = await self._record_signs(list(dict.fromkeys(keys)))
        answers: list[Signed | Exception] = []
        for host_id, hello in keys:
            outcome = outcomes[host_id]
            if isinstance(outcome, Exception):
                answers.append(outcome)
            else:
                answers.append((outcome, gpus.get(host_id, []) if hello else ()))
        return answers

    async def _record_signs(
        self, keys: list[tuple[str, bool]]
    ) -> tuple[dict[str, Host | Exception], dict[str, list[Gpu]]]:
        """One transaction for these signs of life: each host (or why it was refused), and
        the GPUs of those that said hello."""
        hellos = {host_id for host_id, hello in keys if hello}
        outcomes: dict[str, Host | Exception] = {}
        gpus: dict[str, list[Gpu]] = {}
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            hosts = await repo.hosts_by_id(sorted({host_id for host_id, _ in keys}))
            # Once the database answered: a writer that waited its turn behind a reconnect
            # storm must not record the time it started waiting, already near the cutoff.
            now = utcnow()
            for host_id in sorted({host_id for host_id, _ in keys}):
                host = hosts.get(host_id)
                if host is None:
                    outcomes[host_id] = NotFound(f"host_id: no host {host_id!r}")
                elif host.revoked_at is not None:
                    # Another replica revoked it while its stream here was open.
                    outcomes[host_id] = Unauthenticated(REVOKED)
                else:
                    _sign_of_life(repo, host, host_id in hellos, now)
                    outcomes[host_id] = host
            for gpu in await repo.gpus_of(sorted(hellos & hosts.keys())):
                gpus.setdefault(gpu.host_id, []).append(gpu)
        self._up.update(h for h, outcome in outcomes.items() if isinstance(outcome, Host))
        return outcomes, gpus

    @contextlib.contextmanager
    def serving_sign_of_life(self, host_id: str) -> Iterator[None]:
        """While the block runs, the host is not declared lost: it spoke, and what it said
        waits its turn here (a Connect's hello, a heartbeat queued behind a reconnect storm)."""
        count, since = self._pending.get(host_id, (0, time.monotonic()))
        self._pending[host_id] = (count + 1, since)
        try:
            yield
        finally:
            count, since = self._pending.pop(host_id, (1, since))
            if count > 1:
                self._pending[host_id] = (count - 1, since)

    def acknowledged(self, host_id: str) -> None:
        """The daemon's hello was answered: a sign of life as of now (written at the next
        flush), when the hello's heartbeat went through (the host is up here)."""
        if host_id in self._up:
            self._heard.add(host_id)

    async def _heard_from(self, host_id: str) -> None:
        if host_id in self._up:
            self._heard.add(host_id)
        else:
            with self.serving_sign_of_life(host_id):
                await self._record_heartbeat(host_id)

    async def flush_heartbeats(self) -> None:
        """Writes the heartbeats heard since the last flush, in one statement."""
        if not self._heard:
            return
        heard, self._heard = self._heard, set()
        try:
            async with self.db.transaction() as session:
                repo = RegistryRepository(session)
                if await repo.record_heartbeats(heard, utcnow()) < len(heard):
                    # Lost meanwhile (another replica, or a slow flush): their next heartbeat
                    # takes the full path, which brings them back.
                    self._up.difference_update(await repo.not_up_among(heard))
        except BaseException:
            self._heard |= heard  # not written: kept for the next flush, not forgotten
            raise

    def _silence_cutoff(self, timeout: timedelta, now: datetime) -> tuple[datetime, float]:
        """The heartbeat time before which a host has been silent for `timeout` of this
        process's serving time (the loop's stalls do not count: what arrived meanwhile had
        not been read yet), allowing for another replica's write lag; and, in monotonic
        time, when a pending sign of life began for it to be that old."""
        silent = timeout.total_seconds() + self.heartbeat_write_interval
        back = self.loop_lag.served_lookback(silent)
        return now - timedelta(seconds=back), time.monotonic() - back

    async def stale_hosts(self, timeout: timedelta, now: datetime) -> Sequence[str]:
        """Marks hosts without a heartbeat for `timeout` of serving time as lost; returns
        their ids. Flushes this process's heartbeats first; spares those heard or being
        served since (another replica's may lag by its write interval)."""
        await self.flush_heartbeats()
        cutoff, began_before = self._silence_cutoff(timeout, now)
        spared = set(self._heard)
        spared.update(h for h, (_, since) in self._pending.items() if since > began_before)
        for host_id, since in list(self._registered.items()):
            if since > began_before:
                spared.add(host_id)
            else:  # its daemon never connected here: the timeout runs as for any host
                del self._registered[host_id]
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            hosts = [h for h in await repo.stale_online_hosts(cutoff) if h.id not in spared]
            for host in hosts:
                why = f"no heartbeat since {host.last_heartbeat_at}"
                set_host_state(repo, host, HostState.LOST, why, now)
            lost = [h.id for h in hosts]
        self._up.difference_update(lost)
        if self.monitor is not None:
            self.monitor.forget(lost)
        return lost


def _sign_of_life(repo: RegistryRepository, host: Host, hello: bool, now: datetime) -> None:
    """A lost host is back; a REGISTERED one is admitted on its daemon's hello, if the
    verification gate lets it (states.hello_state)."""
    host.last_heartbeat_at = now
    if host.state == HostState.LOST.value:
        set_host_state(repo, host, returning_state(host), "heartbeat after loss", now)
    elif host.state == HostState.REGISTERED.value and hello:
        admitted = hello_state(host)
        if admitted is not None:
            set_host_state(repo, host, admitted, "its daemon connected (hello)", now)
