"""Raw byte streams into a running workload's port for the control plane's own use (the services
gateway), over connections its daemon keeps standing at the data port: no command per stream."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeAlias

from gpuplane.v1 import registry_pb2, tunnels_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.commands.repository import CommandRepository
from controlplane.db.base import utcnow
from controlplane.errors import FailedPrecondition, Unavailable
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import JobState
from controlplane.tunnels.data import Standing
from messaging.rawpath import HIGH_WATER, Link

if TYPE_CHECKING:
    from controlplane.tunnels.service import TunnelService

Streams: TypeAlias = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# Connections a daemon keeps standing per workload port (each one a gateway request takes is
# replaced at once), and how long an unused pool is kept before it is let go.
STANDING = 8
IDLE_SECONDS = 60.0


class StandingStreams:
    """Per (workload, port): a pool of standing connections (`Standing` on the data port),
    asked of the workload's daemon once with a TunnelCommand (`standing`); each stream takes
    one, so a stream costs no command round trip, only the daemon's connection into the
    container. A pool that failed a stream, or lost a connection while idle (its daemon let
    it go: the attempt ended), is dropped; the next stream asks again."""

    def __init__(self, tunnels: TunnelService, count: int = STANDING) -> None:
        self.tunnels = tunnels
        self.count = count
        self._pools: dict[tuple[str, int], Standing] = {}
        self._used: dict[tuple[str, int], float] = {}
        self._opening: dict[tuple[str, int], asyncio.Lock] = {}
        self._swept = time.monotonic()

    @asynccontextmanager
    async def open_stream(self, job_id: str, port: int) -> AsyncIterator[Streams]:
        """A byte stream to 127.0.0.1:port in the job's container (the caller authorised
        it); FailedPrecondition when the job is not running, Unavailable when its daemon
        keeps no connection here in time. Closed on the way out."""
        key = (job_id, port)
        if time.monotonic() - self._swept > IDLE_SECONDS / 4:
            self._sweep()
        pool = await self._pool(key)
        link = await self._take(key, pool)
        reader, writer = streams_of(link)
        try:
            yield reader, writer
        except BaseException:
            self._drop(key, pool)
            raise
        finally:
            writer.close()

    async def _take(self, key: tuple[str, int], pool: Standing) -> Link:
        try:
            link = await pool.take(self.tunnels.open_timeout)
        except TimeoutError:
            link = None
        if link is None:
            self._drop(key, pool)
            raise Unavailable(
                f"the host of {key[0]} keeps no connection to this control plane (its daemon "
                "may be disconnected or busy); try again"
            )
        self._used[key] = time.monotonic()
        return link

    async def _pool(self, key: tuple[str, int]) -> Standing:
        pool = self._pools.get(key)
        if pool is not None and not pool.closed:
            return pool
        lock = self._opening.setdefault(key, asyncio.Lock())
        async with lock:  # one command for the callers that arrive together
            pool = self._pools.get(key)
            if pool is not None and not pool.closed:
                return pool
            pool = await self._ask(*key)
            self._pools[key] = pool
            self._used[key] = time.monotonic()
            return pool

    async def _ask(self, job_id: str, port: int) -> Standing:
        """A new pool, and the command asking the job's daemon to keep it."""
        tunnels = self.tunnels
        data = tunnels.data
        if data is None:
            raise FailedPrecondition("this control plane has no tunnel data port")
        # Room for more than `count`: one the daemon opens while a taken one is still idle there.
        pool = data.standing(secrets.token_urlsafe(24), 2 * self.count)

        async def work(session: AsyncSession) -> str:
            job = await JobRepository(session).get(job_id)
            if job is None or job.state != JobState.RUNNING.value or not job.host_id:
                raise FailedPrecondition(f"job_id: job {job_id} is not running")
            command = tunnels_pb2.TunnelCommand(
                tunnel_id=pool.token,
                job_id=job.id,
                attempt=job.attempt,
                address=tunnels.address,
                port=port,
                data_address=tunnels.data_address,
                data_tls=data.tls,
                standing=self.count,
            )
            message = registry_pb2.ControlMessage(tunnel=command)
            await CommandRepository(session).issue(job.host_id, message, utcnow())
            return job.host_id

        try:
            tunnels.streams.wake(await tunnels.db.run(work))
        except BaseException:
            data.drop_standing(pool)
            raise
        return pool

    def _drop(self, key: tuple[str, int], pool: Standing) -> None:
        if self._pools.get(key) is pool:
            del self._pools[key]
            self._used.pop(key, None)
            self._opening.pop(key, None)
        if self.tunnels.data is not None:
            self.tunnels.data.drop_standing(pool)

    def _sweep(self) -> None:
        """Lets go of pools nobody used for IDLE_SECONDS (their daemons stop keeping them)."""
        self._swept = time.monotonic()
        stale = self._swept - IDLE_SECONDS
        for key, used in list(self._used.items()):
            if used < stale:
                self._drop(key, self._pools[key])

    def close(self) -> None:
        for key, pool in list(self._pools.items()):
            self._drop(key, pool)


def streams_of(link: Link) -> Streams:
    """An accepted data-port connection as asyncio streams (what it held comes first)."""
    loop = asyncio.get_running_loop()
    transport = link.transport
    assert transport is not None
    reader = asyncio.StreamReader(limit=HIGH_WATER, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if link.held:
        reader.feed_data(bytes(link.held))
    if link.eof:
        reader.feed_eof()
    transport.resume_reading()
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
