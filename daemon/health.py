"""Service replicas' health: probed inside the container's network namespace, reported."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gpuplane.v1 import messaging_pb2, registry_pb2

from daemon.exec_io import connect_in_netns
from daemon.progress import Progress

if TYPE_CHECKING:
    from daemon.executor import JobExecutor

log = logging.getLogger(__name__)
StopReason = messaging_pb2.StopReason
Send = Callable[[registry_pb2.DaemonMessage], bool]
# How often a replica is probed, how long one probe may take, how many failures in a row
# after it passed once stop it, and how long a replica that never passed may take to start.
INTERVAL = 1.0
TIMEOUT = 2.0
LIVENESS_FAILURES = 3
START_GRACE = 60.0
# How often a replica waiting for its restart in place is looked at again.
POLL = 0.05


def probe(pid: int, port: int, path: str, timeout: float = TIMEOUT) -> str:
    """One probe of the container whose process is `pid` (blocking): "" when it passed, else
    why not. With `path`: an HTTP/1.0 GET answered 2xx or 3xx; without: a TCP connect."""
    try:
        sock = connect_in_netns(pid, port, timeout)
    except OSError as error:
        return f"port {port}: {error.strerror or error}"
    try:
        if not path:
            return ""
        sock.setblocking(True)
        sock.settimeout(timeout)
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        head = sock.recv(64).split(b"\r\n", 1)[0].decode(errors="replace")
    except (TimeoutError, OSError) as error:
        return f"GET {path}: {error}"
    finally:
        sock.close()
    parts = head.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        return f"GET {path}: not an HTTP answer"
    if parts[1][:1] in ("2", "3"):
        return ""
    return f"GET {path}: HTTP {parts[1]}"


class ReplicaHealth:
    """Probes a running replica every INTERVAL; tells the control plane when its readiness or
    its restarts in place change (ReplicaHealth, resent while unsent); has its container
    restarted in place (daemon/restarts.py: not ready meanwhile, probed afresh after) after
    LIVENESS_FAILURES failures in a row once it had passed, or when it never passed within
    START_GRACE of its start; the restarts used up, the attempt stops
    (STOP_REASON_LIVENESS_FAILED)."""

    def __init__(self, executor: JobExecutor, pid_of: Callable[[str], int], send: Send) -> None:
        self.executor = executor
        self.pid_of = pid_of
        self.send = send
        spec = executor.dispatch.spec.service_replica
        self.port, self.path = spec.port, spec.health_path
        self.ready: bool | None = None
        self._reported: tuple[bool, int] | None = None  # ready, restarts
        self._task: asyncio.Task[None] | None = None
        if executor.replica is not None:
            executor.replica.on_restart = self.restarted

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"health-{self.executor.job_id}")
        return self._task

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        while self.executor.progress is not Progress.RUNNING or not self.executor.container_id:
            if self.executor.terminal is not None:
                return
            await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        run = -1  # the restarts made when the counts below began
        started, failures, passed = 0.0, 0, False
        while self.executor.terminal is None:
            if self._restarting():
                await asyncio.sleep(POLL)
                continue
            if run != self.executor.restarts:  # (re)started: probed afresh
                run, started, failures, passed = self.executor.restarts, loop.time(), 0, False
            why = await self._probe_once()
            if self._restarting() or run != self.executor.restarts:
                continue  # a probe of a container being restarted says nothing of the next
            passed = passed or not why
            failures = failures + 1 if why else 0
            self._set(not why, why)
            never = not passed and loop.time() - started > START_GRACE
            if (passed and failures >= LIVENESS_FAILURES) or never:
                await self._fail(why, failures if passed else 0, run)
                continue
            await asyncio.sleep(INTERVAL)

    def _restarting(self) -> bool:
        return self.executor.replica is not None and self.executor.replica.restarting

    def restarted(self, why: str) -> None:
        """Its container is restarted in place: not ready until a probe passes again."""
        self._set(False, why)

    async def _probe_once(self) -> str:
        try:
            pid = await asyncio.to_thread(self.pid_of, self.executor.container_id)
        except Exception as error:  # noqa: BLE001 - a container going away: a failed probe
            return f"container: {error}"
        if pid <= 0:
            return "container: not running"
        return await asyncio.to_thread(probe, pid, self.port, self.path)

    def _set(self, ready: bool, why: str) -> None:
        """Records the probe's result and reports it with the restarts made so far when
        either changed (or was not sent yet)."""
        self.ready = ready
        state = (ready, self.executor.restarts)
        if self._reported == state:
            return
        health = registry_pb2.ReplicaHealth(
            job_id=self.executor.job_id,
            attempt=self.executor.dispatch.attempt,
            ready=ready,
            reason=why,
            restarts=state[1],
        )
        if self.send(registry_pb2.DaemonMessage(replica_health=health)):
            self._reported = state
            log.info("replica %s: %s", self.executor.job_id, "ready" if ready else why)

    async def _fail(self, why: str, failures: int, run: int) -> None:
        """Failed liveness: its container is restarted in place (or the attempt stops, its
        restarts used up); returns once that has begun."""
        text = (
            f"failed its health probe {failures} times in a row: {why}"
            if failures
            else f"never passed its health probe within {START_GRACE:.0f} s: {why}"
        )
        log.warning("replica %s %s", self.executor.job_id, text)
        replica = self.executor.replica
        if replica is None:  # not a replica: nothing restarts it
            await self.executor.cancel(StopReason.STOP_REASON_LIVENESS_FAILED, text)
            return
        await replica.fail_liveness(text)
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while self.executor.terminal is None and not self._restarting():
            if run != self.executor.restarts or asyncio.get_running_loop().time() > deadline:
                return  # restarted already, or the kill failed: probed on
            await asyncio.sleep(POLL)
