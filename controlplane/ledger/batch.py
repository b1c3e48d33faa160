"""Group commit: concurrent requests coalesced into batches, each run as one transaction.

A request that arrives while `max_in_flight` batches are running waits for the next batch;
one that finds a free slot runs at once (alone, if it is alone), so batching adds no latency
to a single caller and turns N concurrent callers into N/batch transactions (TigerBeetle's
batching of transfers, on PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class GroupCommit(Generic[Request, Result]):
    def __init__(
        self,
        # Runs a batch; answers per request its result or the error that request raises.
        execute: Callable[[Sequence[Request]], Awaitable[Sequence[Result | Exception]]],
        *,
        max_batch: int = 128,
        max_in_flight: int = 2,
        min_batch: int = 8,
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
            # What waits is shared out over the free slots (but no batch smaller than
            # min_batch), so batches overlap: one's Python work while another's SQL runs.
            free = self.max_in_flight - self._in_flight
            share = max(self.min_batch, -(-len(self._queue) // free))
            size = min(self.max_batch, share)
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
