"""Liveness counts serving time: a host is not declared lost because this process's event loop
stalled (its heartbeat arrived and waited to be read), nor while its hello or a registration's
Connect waits its turn; a host silent while the loop served is lost as before. A second
RegistryService on the plane's database, without background loops, is driven by hand."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from controlplane.db.base import utcnow
from controlplane.registry.lag import LoopLag
from controlplane.registry.service import RegistryService
from tests.controlplane.registry.test_liveness_writes import connected, last_heartbeat
from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(30), pytest.mark.plane(heartbeat_timeout_ms=600_000)]
TIMEOUT = timedelta(seconds=1)


def test_served_lookback_adds_the_stalls_inside_it() -> None:
    lag = LoopLag(interval=0.05)
    assert lag.served_lookback(10.0, now=1000.0) == pytest.approx(10.0)
    lag.note(995.0, 3.0)  # the loop woke 3 s late at 995: 3 s of the last 10 were not served
    assert lag.stalled_since(990.0, now=1000.0) == pytest.approx(3.0)
    assert lag.served_lookback(10.0, now=1000.0) == pytest.approx(13.0)
    assert lag.largest(20.0, now=1000.0) == pytest.approx(3.0)
    # A stall just before the span: the longer span reaches it, and back further still.
    earlier = LoopLag(interval=0.05)
    earlier.note(988.0, 2.0)
    earlier.note(995.0, 3.0)
    earlier.note(999.0, 0.01)  # under the threshold: timer noise, not a stall
    assert earlier.served_lookback(10.0, now=1000.0) == pytest.approx(15.0)


async def lost_within(registry: RegistryService, host_id: str, seconds: float) -> None:
    """Runs the loss check until it declares `host_id` lost (the loop's own stalls, on a
    loaded machine, rightly add to the timeout)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        if await registry.stale_hosts(TIMEOUT, utcnow()) == [host_id]:
            return
    raise AssertionError(f"{host_id} was never declared lost")


@contextlib.asynccontextmanager
async def measuring(registry: RegistryService) -> AsyncIterator[None]:
    task = asyncio.create_task(registry.loop_lag.run())
    await asyncio.sleep(0.1)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_stalled_loop_does_not_lose_a_host_that_kept_heartbeating(
    plane: JobPlane,
) -> None:
    registry, _, host_id = await connected(plane)
    async with measuring(registry):
        await registry.flush_heartbeats()
        # Busy with a storm: the daemon's heartbeats arrive but are not read for 1.5 s,
        # longer than the timeout; the loss check runs before they are.
        time.sleep(1.5)  # noqa: ASYNC251 - the stall under test
        assert registry.loop_lag.largest(5.0) >= 1.4
        assert await registry.stale_hosts(TIMEOUT, utcnow()) == []
        await registry.heartbeat(host_id)  # read at last
        assert await registry.stale_hosts(TIMEOUT, utcnow()) == []
        # A host silent while the loop served is lost as before.
        await lost_within(registry, host_id, 10.0)


async def test_a_host_whose_hello_waits_its_turn_is_not_lost(plane: JobPlane) -> None:
    registry, _, host_id = await connected(plane)
    async with measuring(registry):
        await last_heartbeat(plane, host_id, set_to=utcnow() - 10 * TIMEOUT)
        with registry.serving_sign_of_life(host_id):
            assert await registry.stale_hosts(TIMEOUT, utcnow()) == []
            # Served for longer than the timeout without getting through: lost after all.
            await lost_within(registry, host_id, 10.0)


async def test_a_registered_host_is_not_lost_before_its_hello(plane: JobPlane) -> None:
    registry, _, host_id = await connected(plane)
    async with measuring(registry):
        await last_heartbeat(plane, host_id, set_to=utcnow() - 10 * TIMEOUT)
        registry._registered[host_id] = time.monotonic()  # as RegisterHost leaves it
        assert await registry.stale_hosts(TIMEOUT, utcnow()) == []
        # Its daemon never said hello: the timeout runs from the registration.
        await lost_within(registry, host_id, 10.0)
        assert host_id not in registry._registered
