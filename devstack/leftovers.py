"""Servers an earlier run left running (it was killed): found by their PID files, stopped."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from devstack.docker_engine import kill_processes_mentioning, unmount_under
from devstack.process import DevstackError, process_start_ticks

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Leftover:
    """A server process a PID file names, still running."""

    name: str
    pid: int
    pid_file: Path
    dirs: tuple[Path, ...]

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid}, {self.pid_file})"


def find_leftovers(root: Path) -> list[Leftover]:
    """The servers whose PID files lie in `root` or one level below and that still run
    (same pid and start time). PID files of servers that are gone are removed."""
    found = []
    for pid_file in sorted([*root.glob("*.pid"), *root.glob("*/*.pid")]):
        try:
            record = json.loads(pid_file.read_text())
            pid, started = int(record["pid"]), record["started"]
            name, dirs = str(record["name"]), tuple(Path(d) for d in record.get("dirs", ()))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a devstack PID file (or half written): not ours to act on
        if started is not None and process_start_ticks(pid) == started:
            found.append(Leftover(name, pid, pid_file, dirs))
        else:
            _tidy(pid_file, dirs)
    return found


def stop_leftovers(root: Path) -> list[Leftover]:
    """Stops the servers find_leftovers names (SIGTERM to each one's process group, SIGKILL
    after STOP_TIMEOUT), tidies their directories and returns them."""
    leftovers = find_leftovers(root)
    for leftover in leftovers:
        log.warning("stopping %s, left running by an earlier run", leftover)
        _signal_group(leftover.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for leftover in leftovers:
        started = process_start_ticks(leftover.pid)
        while started is not None and process_start_ticks(leftover.pid) == started:
            if time.monotonic() > deadline + STOP_TIMEOUT:
                raise DevstackError(f"could not stop {leftover}: it outlived SIGKILL")
            if time.monotonic() > deadline:
                _signal_group(leftover.pid, signal.SIGKILL)
            time.sleep(0.05)
        _tidy(leftover.pid_file, leftover.dirs)
    return leftovers


def _signal_group(pid: int, signum: int) -> None:
    """Each server leads its own session (ManagedProcess), so its group is its helpers too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def _tidy(pid_file: Path, dirs: tuple[Path, ...]) -> None:
    for directory in dirs:
        if directory.exists():
            kill_processes_mentioning(str(directory))
            unmount_under(directory)
            shutil.rmtree(directory, ignore_errors=True)
    pid_file.unlink(missing_ok=True)
