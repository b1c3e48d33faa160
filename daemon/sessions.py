"""Interactive sessions on the daemon: their SSH keys, and the deadline it enforces itself."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import tarfile
import time
from typing import TYPE_CHECKING

from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.journal import Journal

if TYPE_CHECKING:
    from daemon.executor import JobExecutor

log = logging.getLogger(__name__)
StopReason = messaging_pb2.StopReason
# The hard maximum of a session from its container's start, extensions included: whatever
# the control plane says (or when it cannot say anything), a session is stopped there.
MAX_SESSION_SECONDS = 12 * 3600
AUTHORIZED_KEYS = "root/.ssh/authorized_keys"
RECHECK_SECONDS = 1.0


def is_session(spec: types_pb2.JobSpec) -> bool:
    return spec.HasField("session")


def authorized_keys_tar(keys: list[str]) -> bytes:
    """A tar of /root/.ssh (mode 700) holding authorized_keys (mode 600) with `keys`, owned
    by root, for Docker's put_archive at "/" on the created container."""
    data = "".join(f"{key.strip()}\n" for key in keys).encode()
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo("root/.ssh")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o700, now
        tar.addfile(folder)
        entry = tarfile.TarInfo(AUTHORIZED_KEYS)
        entry.size, entry.mode, entry.mtime = len(data), 0o600, now
        tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def remember_dispatch(journal: Journal, dispatch: messaging_pb2.DispatchMessage) -> None:
    """Rewrites the attempt's journaled dispatch (blocking), if it has an entry still: an
    ended attempt's entry is gone and must not come back."""
    if journal.get(dispatch.job_id, dispatch.attempt) is None:
        return
    encoded = base64.b64encode(dispatch.SerializeToString()).decode()
    journal.update(dispatch.job_id, dispatch.attempt, dispatch_b64=encoded)


class SessionDeadline:
    """Stops a session's attempt (STOPPED, STOP_REASON_TIMED_OUT) once its container has run
    `seconds` (at most MAX_SESSION_SECONDS), counted from the container's start; an
    ExtendCommand moves it (extend)."""

    def __init__(self, executor: JobExecutor, seconds: float, tick: float = 0.1) -> None:
        self.executor = executor
        self.seconds = min(float(seconds), MAX_SESSION_SECONDS)
        self.tick = tick
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"deadline-{self.executor.job_id}")
        return self._task

    def close(self) -> None:
        """The attempt ended: nothing left to enforce."""
        if self._task is not None:
            self._task.cancel()

    def extend(self, seconds: float) -> None:
        """The session's duration is now `seconds` from its start (capped at the maximum)."""
        self.seconds = min(float(seconds), MAX_SESSION_SECONDS)
        self._changed.set()
        log.info("session %s: duration now %.0f s", self.executor.job_id, self.seconds)

    def remaining(self) -> float | None:
        """Seconds left before the deadline; None while the container has not started."""
        started = self.executor._started_at
        if not started:
            return None
        return started + self.seconds - time.monotonic()

    async def run(self) -> None:
        """Waits for the container's start, then for the deadline (moved by extend), then
        stops the attempt unless it ended meanwhile."""
        while self.executor.terminal is None:
            left = self.remaining()
            if left is not None and left <= 0:
                break
            self._changed.clear()
            # Looked at again at least every RECHECK_SECONDS: an adopted container's start is
            # corrected once Docker has said when it was (JobExecutor._resume).
            wait = self.tick if left is None else min(left, RECHECK_SECONDS)
            try:
                async with asyncio.timeout(wait):
                    await self._changed.wait()
            except TimeoutError:
                continue
        if self.executor.terminal is not None:
            return
        log.info("session %s reached its deadline: destroying it", self.executor.job_id)
        await self.executor.cancel(
            StopReason.STOP_REASON_TIMED_OUT,
            f"session expired: its {self.seconds:.0f} s are up",
        )
