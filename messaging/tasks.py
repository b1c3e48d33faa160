"""Stopping asyncio tasks that a library may keep alive after a cancel.

nats-py turns a cancelled `next_msg`/`fetch` into `ConnectionClosedError` when the connection
is closing, and Python 3.11's `asyncio.wait_for` returns a result that raced a cancel instead
of raising. A loop that catches `Exception` and retries then never ends, and `await task`
after `task.cancel()` waits forever. `stop_tasks` cancels again until each task has ended,
within a bound, and names the ones that would not stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)
# A step of a stop that takes longer than this is logged as a warning, with its time
# (`timed(..., warn_after=SLOW_STEP_SECONDS)`): a slow stop names its step.
SLOW_STEP_SECONDS = 1.0


async def stop_tasks(
    tasks: Iterable[asyncio.Task[Any]], timeout: float = 10.0, every: float = 0.2
) -> list[asyncio.Task[Any]]:
    """Cancels `tasks` and waits for them, cancelling again every `every` seconds for those
    still running (a swallowed cancel), for at most `timeout` seconds. Returns (and logs) the
    tasks that were still running then; their results and errors are consumed."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(every, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as never retrieved
    if pending:
        names = sorted(task.get_name() for task in pending)
        log.error("tasks still running %.0fs after cancel: %s", timeout, ", ".join(names))
    return sorted(pending, key=lambda task: task.get_name())


def stopping() -> bool:
    """Whether the current task has been asked to stop: a loop that caught a library's error
    checks this before retrying, since the error may be a cancel in disguise."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@contextlib.contextmanager
def timed(logger: logging.Logger, what: str, warn_after: float | None = None) -> Iterator[None]:
    """Logs how long the block took ("WHAT took 0.52s", errors included): at INFO, or with
    `warn_after` at DEBUG when quicker and at WARNING when slower. For the steps of a stop,
    so that a slow one names itself."""
    began = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - began
        level = logging.INFO
        if warn_after is not None:
            level = logging.WARNING if took >= warn_after else logging.DEBUG
        logger.log(level, "%s took %.2fs", what, took)
