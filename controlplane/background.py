"""Background loops of one control plane: scheduling leadership and the scheduler (on the
leader only), outbox relay, report consumer, liveness, hold expiry, spending limits, command
delivery (on every replica: each leases its rows, applies idempotently or delivers only its own
hosts')."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from controlplane.bus import Bus
from controlplane.db.base import utcnow
from controlplane.errors import Conflict, NotLeader, Unavailable
from controlplane.jobs.consumer import ReportConsumer
from controlplane.jobs.notify import Notifier
from controlplane.jobs.service import JobService
from controlplane.jobs.signatures import ReportSignatures
from controlplane.jobs.spending import TenantSpend
from controlplane.outbox.relay import OutboxRelay
from controlplane.registry.natsauth import NatsAuth
from controlplane.registry.service import RegistryService
from controlplane.scheduler.leader import Leadership, SoleLeader
from controlplane.scheduler.service import Scheduler
from messaging.tasks import stop_tasks, stopping

log = logging.getLogger(__name__)


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    """Waits until `event` is set or `timeout` passed, then clears it; whether it was set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):  # unlike 3.11's wait_for, never eats a cancel
            await event.wait()
    woken = event.is_set()
    event.clear()
    return woken


class Background:
    def __init__(
        self,
        *,
        bus: Bus,
        notifier: Notifier,
        scheduler: Scheduler,
        jobs: JobService,
        registry: RegistryService,
        scheduler_interval: float,
        heartbeat_timeout: float,
        hold_expiry_interval: float = 30.0,
        leader: Leadership | None = None,
        nats_auth: NatsAuth | None = None,
        nats_account_sync_interval: float = 300.0,
        on_report_dropped: Callable[[str], None] | None = None,
        refresh_gauges: Callable[[], Awaitable[None]] | None = None,
        gauges_interval: float = 15.0,
        spending_interval: float = 5.0,
        on_spending: Callable[[list[TenantSpend]], None] | None = None,
        sessions: Callable[[], Awaitable[None]] | None = None,
        services: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.bus = bus
        self.notifier = notifier
        self.scheduler = scheduler
        self.leader: Leadership = leader if leader is not None else SoleLeader()
        self.jobs = jobs
        self.registry = registry
        self.scheduler_interval = scheduler_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.hold_expiry_interval = hold_expiry_interval
        self.nats_auth = nats_auth
        self.nats_account_sync_interval = nats_account_sync_interval
        self.on_report_dropped = on_report_dropped
        self.refresh_gauges = refresh_gauges
        self.gauges_interval = gauges_interval
        self.spending_interval = spending_interval
        self.on_spending = on_spending
        self.report_consumer: ReportConsumer | None = None
        # Running sessions' expiry warnings and deadlines (controlplane/sessions/expiry.py).
        self.sessions = sessions
        # The services' reconciler, leader-only (controlplane/services/reconciler.py).
        self.services = services
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        loops: list[tuple[str, Callable[[], Awaitable[None]], bool]] = [
            ("bus", self._connect_bus, True),
            ("leader", self.leader.campaign, True),
            ("scheduler", self._schedule, False),
            ("outbox", self._relay, False),
            ("reports", self._consume, False),
            ("liveness", self._liveness, False),
            ("loop-lag", self.registry.loop_lag.run, False),
            ("holds", self._expire_holds, False),
            ("commands", self.registry.commands.run, False),
            ("commands-announce", self._announce_commands, False),
            ("spending", self._enforce_spending_limits, False),
        ]
        if self.nats_auth is not None:
            loops.append(("nats-account", self._sync_nats_account, False))
        if self.refresh_gauges is not None:
            loops.append(("gauges", self._gauges, False))
        if self.sessions is not None:
            loops.append(("sessions", self.sessions, False))
        if self.services is not None:
            loops.append(("services", self.services, False))
        self._tasks = {
            name: asyncio.create_task(self._supervise(name, loop, once=once), name=name)
            for name, loop, once in loops
        }

    async def stop_scheduling(self) -> None:
        """Stops placing and gives leadership up, so another replica takes over at its next
        check instead of after the lease ttl (a graceful shutdown calls this first)."""
        await stop_tasks([self._tasks.pop(n) for n in ("scheduler", "leader") if n in self._tasks])
        await self.leader.release()

    async def stop(self) -> None:
        await self.stop_scheduling()
        await stop_tasks(list(self._tasks.values()))
        self._tasks = {}

    async def _supervise(
        self, name: str, loop: Callable[[], Awaitable[None]], once: bool = False
    ) -> None:
        """Runs `loop` forever, logging and restarting it after unexpected errors."""
        while True:
            try:
                await loop()
                if once:
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a loop must survive a bad cycle
                if stopping():  # a cancel that a library turned into another error
                    raise asyncio.CancelledError from None
                log.exception("background loop %s failed; restarting in 1s", name)
                await asyncio.sleep(1.0)

    async def _connect_bus(self) -> None:
        await self.bus.connect()

    async def _schedule(self) -> None:
        """Scheduling cycles while this process leads; a new term starts with one at once
        (the old leader may have left jobs queued)."""
        while True:
            if self.leader.leading:
                await _wait(self.notifier.schedule, self.scheduler_interval)
            else:
                await self.leader.wait_leading()
            try:
                while (
                    self.leader.leading and await self.scheduler.run_once() and self.scheduler.more
                ):
                    pass
            except NotLeader as error:
                log.warning("scheduling cycle fenced off, nothing placed: %s", error.message)
            except Conflict:
                self.notifier.schedule.set()  # lost a race: run the cycle again at once

    async def _relay(self) -> None:
        await self.bus.ready.wait()
        assert self.bus.js is not None
        relay = OutboxRelay(self.scheduler.db, self.bus.js)
        # Woken by this process's commit of a row (or after a full batch), the relay leases
        # at once; after the period's timeout (another replica's rows, a failed publish
        # released) it first looks whether any row waits, outside a write transaction. A
        # batch that was not full is the last one: the next comes with the next wake-up.
        pending = False
        while True:
            while await relay.run_once(pending=pending) >= relay.batch:
                pending = True
            pending = await _wait(self.notifier.outbox, 1.0)

    async def _consume(self) -> None:
        await self.bus.ready.wait()
        assert self.bus.js is not None
        signatures = ReportSignatures(
            self.jobs.db, required=self.jobs.policy.require_signed_reports
        )
        consumer = ReportConsumer(
            self.bus.js, self.jobs, on_dropped=self.on_report_dropped, signatures=signatures
        )
        self.report_consumer = consumer
        while True:
            await consumer.run_once(timeout=1.0)

    async def _announce_commands(self) -> None:
        await self.bus.ready.wait()
        assert self.bus.nc is not None
        await self.registry.commands.listen(self.bus.nc)

    async def _sync_nats_account(self) -> None:
        """Pushes the account JWT built from the database once connected, then every
        interval: a restarted nats-server, a new cluster node or a push another replica
        lost all end up with every revocation."""
        assert self.nats_auth is not None
        await self.bus.ready.wait()
        while True:
            try:
                await self.nats_auth.push_account()
                delay = self.nats_account_sync_interval
            except Unavailable as error:
                log.warning("NATS account sync failed (%s); retrying in 2s", error.message)
                delay = 2.0
            await asyncio.sleep(delay)

    async def _gauges(self) -> None:
        """Fleet gauges from the database, at once and then every interval; a database
        that is down leaves the last values and is tried again next interval."""
        assert self.refresh_gauges is not None
        while True:
            try:
                await self.refresh_gauges()
            except (OSError, DBAPIError, SQLAlchemyTimeoutError) as error:
                log.warning("metrics gauges not refreshed: %s", error)
            await asyncio.sleep(self.gauges_interval)

    async def _liveness(self) -> None:
        timeout = timedelta(seconds=self.heartbeat_timeout)
        tick = min(1.0, self.heartbeat_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            lost = await self.registry.stale_hosts(timeout, utcnow())
            if lost:
                log.warning("hosts lost: %s", ", ".join(lost))
            await self.jobs.sweep_lost_attempts()
            await self.jobs.sweep_over_budget()
            await self.jobs.reconcile_running(self.registry.running_lists)
            await self.jobs.resync_connected(list(self.registry.running_lists()))
            await self.registry.maintain()

    async def _expire_holds(self) -> None:
        """Resolves credit holds past their expiry that no outcome resolved (EXPIRED)."""
        while True:
            await asyncio.sleep(self.hold_expiry_interval)
            while len(await self.jobs.expire_holds()) >= 100:
                pass  # a full batch: there may be more due

    async def _enforce_spending_limits(self) -> None:
        """Monthly spending limits: thresholds recorded, jobs at the limit stopped."""
        while True:
            await asyncio.sleep(self.spending_interval)
            spends = await self.jobs.enforce_spending_limits()
            if self.on_spending is not None:
                self.on_spending(spends)
