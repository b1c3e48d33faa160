"""stop_tasks ends tasks whose cancel a library swallowed or turned into another error; timed
logs how long a step of a stop took."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from controlplane.background import Background
from messaging.tasks import stop_tasks, stopping, timed


async def swallows_cancels(times: int, stopped: list[str]) -> None:
    """Eats the first `times` cancels (as 3.11's wait_for can), then lets one through."""
    eaten = 0
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            eaten += 1
            if eaten > times:
                stopped.append("stopped")
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]


async def test_cancels_again_until_a_task_that_swallows_cancels_ends() -> None:
    stopped: list[str] = []
    task = asyncio.create_task(swallows_cancels(3, stopped), name="stubborn")
    await asyncio.sleep(0)
    assert await stop_tasks([task], timeout=5, every=0.01) == []
    assert task.cancelled()
    assert stopped == ["stopped"]


async def test_names_a_task_that_never_stops(caplog: pytest.LogCaptureFixture) -> None:
    stopped: list[str] = []
    task = asyncio.create_task(swallows_cancels(10**9, stopped), name="immortal")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="messaging.tasks"):
        left = await stop_tasks([task], timeout=0.3, every=0.05)
    assert left == [task]
    assert "immortal" in caplog.text
    assert not task.done()
    task.get_coro().close()


async def test_a_cancel_disguised_as_an_error_stops_a_supervised_loop() -> None:
    """nats-py raises ConnectionClosedError from a cancelled next_msg while the connection
    closes; the supervisor must not take that for a bad cycle and restart the loop."""
    cycles: list[bool] = []

    async def loop() -> None:
        cycles.append(stopping())
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionError("connection closed") from None

    supervise = Background._supervise  # the loop runner itself, without a plane around it
    task = asyncio.create_task(supervise(None, "reports", loop))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert await stop_tasks([task], timeout=3, every=5) == []
    assert task.cancelled()
    assert cycles == [False]  # stopped at the first cancel: never restarted


async def test_results_and_errors_of_ended_tasks_are_consumed() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await stop_tasks([task]) == []
    assert isinstance(task.exception(), RuntimeError)


def test_timed_logs_each_step_and_warns_only_past_its_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.timed")
    caplog.set_level(logging.DEBUG, logger="test.timed")
    with timed(logger, "plain"):
        time.sleep(0.05)
    with timed(logger, "quick", warn_after=60.0):
        pass
    with timed(logger, "slow", warn_after=0.0):
        pass
    with pytest.raises(RuntimeError), timed(logger, "failed"):
        raise RuntimeError("boom")
    got = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in got] == ["INFO", "DEBUG", "WARNING", "INFO"]
    names = ("plain", "quick", "slow", "failed")
    assert all(
        re.fullmatch(rf"{n} took \d+\.\d\ds", m) for n, (_, m) in zip(names, got, strict=True)
    )
    assert float(got[0][1].split()[-1].rstrip("s")) >= 0.05
