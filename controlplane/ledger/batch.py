"""Group commit: concurrent requests coalesced into batches, each run as one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class GroupCommit(Generic[Request, Result]):
    """Runs requests in batches, up to `max_in_flight` batches at a time (TigerBeetle's
    batching of transfers, on PostgreSQL).

    A request that finds nothing running runs at once (alone, if it is alone), so batching
    adds no latency to a single caller, and N concurrent callers make about N/batch
    transactions. What waits is shared out over the free slots, so two batches overlap (one's
    Python work while the other's statements run), but never in batches under `min_batch`
    beside one running: a transaction has a fixed cost (round trips, planning) that a small
    batch would not earn back; those requests wait for the next batch instead."""

    def __init__(
        self,
        # Runs a batch; answers per request its result or the error that request raises.
        execute: Callable[[Sequence[Request]], Awaitable[Sequence[Result | Exception]]],
        *,
        max_batch: int = 128,
        max_in_flight: int = 2,
        min_batch: int = 16,
    ) -> None:
        self.execute = execute
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.min_batch = min_batch
        self._queue: list[tuple[Request, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Batches run and requests answered, for tests and benchmarks.
        self.batches = 0
        self.requests = 0

    async def __call__(self, request: Request) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        """Starts batches on the next turn of the event loop, once every caller made ready in
        this turn (by the batch that just finished) has queued its next request."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_batches)

    def _start_batches(self) -> None:
        self._flush_scheduled = False
        while self._queue and self._in_flight < self.max_in_flight:
            least = min(self.min_batch, self.max_batch)
            if self._in_flight and len(self._queue) < least:
                break  # too few to earn a transaction of their own: they join the next batch
            free = self.max_in_flight - self._in_flight
            size = min(self.max_batch, max(least, -(-len(self._queue) // free)))
            batch = self._queue[:size]
            del self._queue[:size]
            self._in_flight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Request, asyncio.Future[Result]]]) -> None:
        try:
            outcomes = await self.execute([request for request, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as error:  # noqa: BLE001 - handed to every caller of the batch
            outcomes = [error] * len(batch)
        finally:
            self._in_flight -= 1
            self.batches += 1
            self.requests += len(batch)
            if self._queue:
                self._schedule_flush()
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the caller gave up (cancelled)
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
