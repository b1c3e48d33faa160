"""Which job a GPU process belongs to: PID → container (its cgroup) → the container's job label.

NVML reports host PIDs, so the daemon must run in the host's PID namespace (as the systemd
unit does). A PID's container is the last 64-hex-digit id in /proc/<pid>/cgroup, which
covers cgroup v1 and v2, the cgroupfs driver (`/docker/<id>`) and the systemd driver
(`/system.slice/docker-<id>.scope`). Processes of other containers, or of none, get "".
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_CONTAINER_ID = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")
ListJobContainers = Callable[[], dict[str, str]]


def container_of(pid: int, proc: Path = Path("/proc")) -> str:
    """The id of the container whose cgroup holds `pid`; "" if none (or the PID is gone)."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return ""
    found = _CONTAINER_ID.findall(text)
    return found[-1] if found else ""


class JobAttribution:
    """Maps PIDs to job ids. Blocking (reads /proc, may list containers): call it from the
    sampling thread.

    `list_containers` returns {container id: job id} for this host's labelled containers; it
    is called again when a PID lands in a container not seen yet, at most once per
    `refresh_seconds`, so a foreign container on the GPU costs one listing per period.
    """

    def __init__(
        self,
        list_containers: ListJobContainers,
        *,
        proc: Path = Path("/proc"),
        refresh_seconds: float = 10.0,
    ) -> None:
        self.list_containers = list_containers
        self.proc = proc
        self.refresh_seconds = refresh_seconds
        self._jobs: dict[str, str] = {}
        self._listed_at = float("-inf")
        self._lock = threading.Lock()

    def job_of(self, pid: int) -> str:
        container = container_of(pid, self.proc)
        if not container:
            return ""
        with self._lock:
            job = self._jobs.get(container)
            if job is None and time.monotonic() - self._listed_at >= self.refresh_seconds:
                self._refresh()
                job = self._jobs.get(container)
        return job or ""

    def forget(self) -> None:
        """Drops the cache, so the next unknown container triggers a listing at once."""
        with self._lock:
            self._listed_at = float("-inf")

    def _refresh(self) -> None:
        self._listed_at = time.monotonic()
        try:
            self._jobs = dict(self.list_containers())
        except Exception as exc:  # noqa: BLE001 - attribution is best effort; samples go on
            log.warning("listing job containers for GPU process attribution failed: %s", exc)
