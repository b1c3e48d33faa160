"""A service replica's restarts in place: how long to wait before each, and when to give up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from docker.errors import DockerException
from gpuplane.v1 import messaging_pb2

if TYPE_CHECKING:
    from docker.models.containers import Container

    from daemon.executor import JobExecutor
    from daemon.journal import JournalEntry
    from daemon.settings import DaemonSettings

log = logging.getLogger(__name__)
StopReason = messaging_pb2.StopReason

# The defaults of DaemonSettings.replica_restart_*: the first restart waits BASE_SECONDS, each
# next one twice as long (capped at MAX_DELAY_SECONDS); a failure with MAX_RESTARTS restarts
# already made within WINDOW_SECONDS ends the attempt instead, and its service replaces it.
BASE_SECONDS = 1.0
MAX_RESTARTS = 3
WINDOW_SECONDS = 300.0
MAX_DELAY_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Restart:
    """One restart granted: its number over the attempt (from 1) and the wait before it."""

    number: int
    delay: float


class RestartPolicy:
    """Grants restarts with an exponential backoff while fewer than `max_restarts` were made
    within the last `window` seconds; `clock` is monotonic seconds (a fake one in tests)."""

    def __init__(
        self,
        *,
        base: float = BASE_SECONDS,
        max_restarts: int = MAX_RESTARTS,
        window: float = WINDOW_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        made: int = 0,
    ) -> None:
        self.base, self.max_restarts, self.window = base, max_restarts, window
        self.max_delay = max_delay
        self.clock = clock
        # Restarts over the whole attempt (kept across a daemon restart: the journal's).
        self.made = made
        self._recent: deque[float] = deque()

    def recent(self) -> int:
        """Restarts made within the window."""
        cutoff = self.clock() - self.window
        while self._recent and self._recent[0] <= cutoff:
            self._recent.popleft()
        return len(self._recent)

    def next(self) -> Restart | None:
        """After a failure: the restart to make (recorded as made now), or None when the
        window's restarts are used up and the attempt ends."""
        recent = self.recent()
        if recent >= self.max_restarts:
            return None
        self._recent.append(self.clock())
        self.made += 1
        return Restart(self.made, min(self.base * 2**recent, self.max_delay))


class ReplicaRestarts:
    """A service replica's restarts in place, for its executor: a container that exits (any
    code, or killed from outside) or fails its liveness probe (fail_liveness) is started again,
    the same container (same name, GPUs, mounts and network: what the health probe and the
    tunnels reach it by), after its policy's backoff, until the policy gives up."""

    def __init__(self, executor: JobExecutor, settings: DaemonSettings) -> None:
        self.executor = executor
        self.policy = RestartPolicy(
            base=settings.replica_restart_backoff_seconds,
            max_restarts=settings.replica_restart_max,
            window=settings.replica_restart_window_seconds,
        )
        # True while the container waits for its restart; each restart is told (health).
        self.restarting = False
        self.on_restart: Callable[[str], None] | None = None
        self.liveness = ""  # why its health probe had the container killed
        self.logs_since: float | None = None  # the latest restart's Unix time

    def resumed(self, journaled: JournalEntry, elapsed: float) -> float:
        """Adopted after a daemon restart: the restarts journaled are counted on, and the
        seconds it has run (Docker's `elapsed` counts from its latest start) from its first."""
        if not journaled.first_started:
            return elapsed
        self.policy.made = journaled.restarts
        return max(elapsed, time.time() - journaled.first_started)

    async def fail_liveness(self, why: str) -> None:
        """The health probe failed: the container is killed, then restarted in place or, the
        restarts used up, the attempt stops (STOP_REASON_LIVENESS_FAILED, `why`)."""
        self.liveness = why
        container = self.executor._container
        if container is not None and not self.restarting:
            try:
                await self.executor.runtime.kill(container)
            except (DockerException, OSError) as exc:  # probed on: failing, it is tried again
                log.warning("%s: its container could not be killed: %s", self.executor.job_id, exc)

    async def after_exit(self, container: Container) -> bool | None:
        """The container ended: None when it is not restarted (its restarts are used up: after
        a liveness failure the attempt then stops as if cancelled); else its backoff, then the
        container started again: True, or False when the attempt was cancelled meanwhile."""
        executor = self.executor
        info = await executor.runtime.inspect(container)
        cause = self.liveness or f"exited with code {info.exit_code}"
        if info.oom_killed and not self.liveness:
            cause += " (out of memory)"
        if (restart := self.policy.next()) is None:
            if self.liveness:
                executor.request_stop(StopReason.STOP_REASON_LIVENESS_FAILED, self.liveness)
            return None
        self.restarting = True
        text = f"{cause}; restart {restart.number} in {restart.delay:g} s"
        log.warning("replica %s/%s: %s", executor.job_id, executor.attempt, text)
        if self.on_restart is not None:
            self.on_restart(text)
        first_started = time.time() - executor._run_time_ms() / 1000
        await executor._journal(restarts=restart.number, first_started=first_started)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(executor._cancel.wait(), restart.delay)
        if executor._cancel.is_set():
            return False
        self.liveness, self.logs_since = "", time.time()
        await executor.runtime.start(container)
        self.restarting = False
        return True
