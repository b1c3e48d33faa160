"""Container logs while a job runs: follow them from threads, keep them, publish them batched."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from messaging.subjects import LOG_END_HEADER, LOG_STREAM_HEADER

if TYPE_CHECKING:
    from docker.models.containers import Container

    from daemon.runtime import DockerRuntime

log = logging.getLogger(__name__)
# How long the log followers get to drain after the container has exited.
LOG_DRAIN_SECONDS = 10.0

PublishLog = Callable[[str, bytes, dict[str, str]], Awaitable[None]]


class LogFollower:
    """Runs each blocking log source (an iterator of (stream name, chunk)) on `executor` and
    hands their chunks to the event loop in order per source. At most `max_pending` chunks
    wait to be consumed: a slow consumer slows the reading threads, never the container
    (Docker keeps the log file)."""

    def __init__(
        self,
        sources: Sequence[Callable[[], Iterable[tuple[str, bytes]]]],
        executor: Executor,
        max_pending: int = 256,
    ) -> None:
        self._sources = sources
        self._executor = executor
        self._queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()
        self._slots = threading.Semaphore(max_pending)
        self._closed = threading.Event()
        self._loop = asyncio.get_running_loop()
        self.errors: list[str] = []
        self._futures = [
            self._loop.run_in_executor(executor, self._produce, index, opener)
            for index, opener in enumerate(sources)
        ]

    def _put(self, item: tuple[str, bytes | None]) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _produce(self, index: int, opener: Callable[[], Iterable[tuple[str, bytes]]]) -> None:
        try:
            for name, chunk in opener():
                while not self._slots.acquire(timeout=0.5):
                    if self._closed.is_set():
                        return
                if self._closed.is_set():
                    return
                self._put((name, chunk))
        except Exception as exc:  # noqa: BLE001 - reported to the consumer, never raised
            self.errors.append(f"logs source {index}: {exc}")
        finally:
            self._put(("", None))  # this source has ended

    async def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        """(stream, chunk) pairs until every source has ended."""
        open_sources = len(self._sources)
        while open_sources:
            name, chunk = await self._queue.get()
            if chunk is None:
                open_sources -= 1
                continue
            self._slots.release()
            yield name, chunk

    def close(self) -> None:
        """Lets the reading threads go at their next chunk."""
        self._closed.set()


class LogPump:
    """Writes a job's log chunks to files (the complete logs, uploaded after exit) and publishes
    them to `subject` in batches of up to `chunk_bytes`, at least every `flush_seconds`."""

    def __init__(
        self,
        subject: str,
        publish: PublishLog | None,
        directory: Path,
        *,
        chunk_bytes: int = 64 * 1024,
        flush_seconds: float = 0.25,
    ) -> None:
        self.subject = subject
        self.publish = publish
        self.paths = {name: directory / f"{name}.log" for name in ("stdout", "stderr")}
        self.chunk_bytes = chunk_bytes
        self.flush_seconds = flush_seconds
        self._files: dict[str, BinaryIO] = {n: p.open("wb") for n, p in self.paths.items()}
        self._buffers: dict[str, bytearray] = {name: bytearray() for name in self.paths}
        self._first_buffered: float | None = None
        self.publish_failures = 0

    async def pump(self, follower: LogFollower) -> None:
        """Consumes `follower` to its end; a failing publish never stops the files."""
        chunks = follower.chunks()
        pending: asyncio.Task[tuple[str, bytes]] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(chunks))
                timeout = None
                if self._first_buffered is not None:
                    elapsed = time.monotonic() - self._first_buffered
                    timeout = max(0.0, self.flush_seconds - elapsed)
                done, _ = await asyncio.wait({pending}, timeout=timeout)
                if not done:
                    await self.flush()
                    continue
                try:
                    name, chunk = pending.result()
                except StopAsyncIteration:
                    break
                pending = None
                self._files[name].write(chunk)
                self._buffers[name] += chunk
                if self._first_buffered is None:
                    self._first_buffered = time.monotonic()
                if len(self._buffers[name]) >= self.chunk_bytes:
                    await self.flush()
        finally:
            if pending is not None:
                pending.cancel()
            await self.flush()
            for handle in self._files.values():
                handle.close()

    async def flush(self) -> None:
        self._first_buffered = None
        for name, buffer in self._buffers.items():
            while buffer:
                data = bytes(buffer[: self.chunk_bytes])
                del buffer[: self.chunk_bytes]
                await self._send(data, {LOG_STREAM_HEADER: name})

    async def end(self) -> None:
        """Publishes the end-of-logs marker for this attempt."""
        await self._send(b"", {LOG_END_HEADER: "1"})

    async def _send(self, data: bytes, headers: dict[str, str]) -> None:
        if self.publish is None:
            return
        try:
            await self.publish(self.subject, data, headers)
        except Exception:  # noqa: BLE001 - logs are also uploaded; live publishing is best effort
            self.publish_failures += 1
            if self.publish_failures == 1:
                log.exception("publishing logs to %s failed", self.subject)


async def drain_logs(
    runtime: DockerRuntime,
    container: Container,
    pump_task: asyncio.Task[None],
    follower: LogFollower,
    pump: LogPump,
    adopted: bool,
    name: str,
) -> None:
    """Lets the followers of the attempt `name` reach the end; if they failed, or the attempt
    was adopted (the followers saw only the end), the files come from `docker logs`."""
    done, _ = await asyncio.wait({pump_task}, timeout=LOG_DRAIN_SECONDS)
    if done and pump_task.exception() is None and not follower.errors and not adopted:
        return
    if not adopted:
        log.warning(
            "following the logs of %s failed (%s): reading them from docker",
            name,
            follower.errors or pump_task.exception() if done else "timed out",
        )
    follower.close()
    pump_task.cancel()
    await asyncio.wait({pump_task})
    stdout, stderr = await runtime.logs(container)
    await asyncio.to_thread(pump.paths["stdout"].write_bytes, stdout)
    await asyncio.to_thread(pump.paths["stderr"].write_bytes, stderr)
