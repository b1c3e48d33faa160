"""Background loops of one control plane: scheduler, outbox relay, report consumer, liveness,
hold expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from controlplane.bus import Bus
from controlplane.db.base import utcnow
from controlplane.errors import Conflict
from controlplane.jobs.consumer import ReportConsumer
from controlplane.jobs.notify import Notifier
from controlplane.jobs.service import JobService
from controlplane.outbox.relay import OutboxRelay
from controlplane.registry.service import RegistryService
from controlplane.scheduler.service import Scheduler

log = logging.getLogger(__name__)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)
    event.clear()


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
    ) -> None:
        self.bus = bus
        self.notifier = notifier
        self.scheduler = scheduler
        self.jobs = jobs
        self.registry = registry
        self.scheduler_interval = scheduler_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.hold_expiry_interval = hold_expiry_interval
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._supervise("bus", self._connect_bus, once=True)),
            asyncio.create_task(self._supervise("scheduler", self._schedule)),
            asyncio.create_task(self._supervise("outbox", self._relay)),
            asyncio.create_task(self._supervise("reports", self._consume)),
            asyncio.create_task(self._supervise("liveness", self._liveness)),
            asyncio.create_task(self._supervise("holds", self._expire_holds)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

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
                log.exception("background loop %s failed; restarting in 1s", name)
                await asyncio.sleep(1.0)

    async def _connect_bus(self) -> None:
        await self.bus.connect()

    async def _schedule(self) -> None:
        while True:
            await _wait(self.notifier.schedule, self.scheduler_interval)
            try:
                while await self.scheduler.run_once():
                    pass
            except Conflict:
                self.notifier.schedule.set()  # lost a race: run the cycle again at once

    async def _relay(self) -> None:
        await self.bus.ready.wait()
        assert self.bus.js is not None
        relay = OutboxRelay(self.scheduler.db, self.bus.js)
        while True:
            while await relay.run_once():
                pass
            await _wait(self.notifier.outbox, 1.0)

    async def _consume(self) -> None:
        await self.bus.ready.wait()
        assert self.bus.js is not None
        consumer = ReportConsumer(self.bus.js, self.jobs)
        while True:
            await consumer.run_once(timeout=1.0)

    async def _liveness(self) -> None:
        timeout = timedelta(seconds=self.heartbeat_timeout)
        tick = min(1.0, self.heartbeat_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            lost = await self.registry.stale_hosts(timeout, utcnow())
            if lost:
                log.warning("hosts lost: %s", ", ".join(lost))
            await self.jobs.sweep_lost_attempts()
            await self.registry.maintain()

    async def _expire_holds(self) -> None:
        """Resolves credit holds past their expiry that no outcome resolved (EXPIRED)."""
        while True:
            await asyncio.sleep(self.hold_expiry_interval)
            while len(await self.jobs.expire_holds()) >= 100:
                pass  # a full batch: there may be more due
