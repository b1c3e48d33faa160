"""Exec sessions through the Docker API and connections inside a container's network namespace."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import docker

log = logging.getLogger(__name__)

# After the hang-up (SIGHUP), how long an exec's command has to end before SIGKILL.
HANGUP_GRACE = 5.0
# docker's multiplexed stream (no tty): an 8-byte header, stream type 1 stdout, 2 stderr.
_HEADER = 8
_CLONE_NEWNET = 0x40000000


@dataclass
class ExecSession:
    """A started `docker exec`: its hijacked connection (non-blocking) and id."""

    api: Any
    exec_id: str
    sock: socket.socket
    tty: bool
    # Bytes the HTTP client read past the upgrade's headers (output already there).
    early: bytes = b""
    # Set once the command is known to have exited (its exit code was read).
    exited: bool = False

    def resize(self, rows: int, cols: int) -> None:
        if self.tty and rows and cols:
            self.api.exec_resize(self.exec_id, height=rows, width=cols)

    def exit_code(self) -> int:
        """The command's exit status (its output ended: it exited, or is about to)."""
        for _ in range(100):
            info = self.api.exec_inspect(self.exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                self.exited = True
                return int(info["ExitCode"])
            threading.Event().wait(0.02)
        return -1

    def hang_up(self, grace: float = HANGUP_GRACE) -> str:
        """Ends the command when its client went away and it still runs (hang_up_exec)."""
        if self.exited:
            return ""
        return hang_up_exec(self.api, self.exec_id, tty=self.tty, grace=grace)


def hang_up_exec(api: Any, exec_id: str, *, tty: bool, grace: float = HANGUP_GRACE) -> str:
    """Ends an exec's command whose client went away, if it still runs (blocking: run it in a
    thread). Docker has no way to stop an exec and keeps draining its output, so a command
    that never reads its input (`cat /dev/zero`) would run, and burn the consumer's GPU host,
    until the container goes. As after ssh: with a terminal, SIGHUP to its process group (its
    process when it leads none) at once; without one, its input has ended (the connection
    closed) and it has `grace` to finish by itself before that SIGHUP. SIGKILL to the process
    if it has not ended `grace` after the SIGHUP. What it started in a group of its own
    (`setsid`, shells' background jobs) survives. Says what it did ("" when it had nothing to
    do)."""
    pid = _running_pid(api, exec_id)
    if not pid:
        return ""
    try:
        handle = os.pidfd_open(pid)
    except OSError:  # ended meanwhile
        return ""
    poller = select.poll()
    poller.register(handle, select.POLLIN)  # readable once the process has ended
    try:
        # Still running under that pid after the handle was opened: the handle is the exec's
        # process, never another that reused the number.
        if _running_pid(api, exec_id) != pid or not _in_container(pid):
            return ""
        if not tty and poller.poll(int(grace * 1000)):
            return ""  # ended by itself on end-of-file
        try:
            group = os.getpgid(pid)
            if group == pid:
                os.killpg(group, signal.SIGHUP)
            else:
                signal.pidfd_send_signal(handle, signal.SIGHUP)
        except ProcessLookupError:
            return ""
        if poller.poll(int(grace * 1000)):
            return "hung up"
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        return "killed"
    except PermissionError as exc:
        log.warning("exec %s… outlives its client: %s", exec_id[:12], exc)
        return ""
    finally:
        os.close(handle)


def hang_up_left_execs(api: Any, exec_ids: list[str], grace: float = HANGUP_GRACE) -> int:
    """Ends the commands still running of execs an earlier run of the daemon started in a
    container it adopts (`ExecIDs` as listed before adopting): their clients' connections
    went with that run, and Docker cannot attach to an exec again, so each is hung up as its
    client going away would have (hang_up_exec), all at once. Returns how many still ran."""
    running: list[tuple[str, bool]] = []
    for exec_id in exec_ids:
        try:
            info = api.exec_inspect(exec_id)
        except docker.errors.NotFound:
            continue
        if info.get("Running"):
            running.append((exec_id, bool((info.get("ProcessConfig") or {}).get("tty"))))
    threads = [
        threading.Thread(
            target=hang_up_exec,
            args=(api, exec_id),
            kwargs={"tty": tty, "grace": grace},
            name=f"hang-up-{exec_id[:12]}",
            daemon=True,
        )
        for exec_id, tty in running
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(running)


def _running_pid(api: Any, exec_id: str) -> int:
    """The exec's command's host pid while it runs (0 once it ended)."""
    info = api.exec_inspect(exec_id)
    return int(info.get("Pid") or 0) if info.get("Running") else 0


def _in_container(pid: int) -> bool:
    """Whether process `pid` of this machine is in a pid namespace other than the daemon's: a
    guard against signalling a local process when the Docker engine's pids are another
    machine's (a remote DOCKER_HOST)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return False


def start_exec(
    client: docker.DockerClient,
    container_id: str,
    command: list[str],
    *,
    tty: bool,
    stdin: bool,
    size: tuple[int, int],
) -> ExecSession:
    """Creates and starts an exec in the container (blocking: run it in a thread)."""
    api = client.api
    created = api.exec_create(container_id, command, stdin=stdin, tty=tty)
    exec_id = created["Id"]
    raw = api.exec_start(exec_id, socket=True, tty=tty)
    sock: socket.socket = getattr(raw, "_sock", raw)
    sock.setblocking(False)
    # The HTTP client's buffer may hold output read with the upgrade's headers: take it
    # (read1 returns what is buffered, else one non-blocking read of the socket).
    response = getattr(raw, "_response", None)
    reader = response.raw._fp.fp if response is not None else None
    early = b""
    if reader is not None:
        try:
            early = reader.read1(65536) or b""
        except (BlockingIOError, OSError, ValueError):
            early = b""
    session = ExecSession(api, exec_id, sock, tty, early)
    session.resize(*size)
    return session


@dataclass
class Demux:
    """Splits docker's multiplexed (non-tty) output into (stream, bytes) pieces."""

    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        self._buffer += data
        while len(self._buffer) >= _HEADER:
            kind = self._buffer[0]
            size = int.from_bytes(self._buffer[4:8], "big")
            if len(self._buffer) < _HEADER + size:
                return
            piece = bytes(self._buffer[_HEADER : _HEADER + size])
            del self._buffer[: _HEADER + size]
            yield kind, piece


def enter_net_namespace(pid: int) -> None:
    """Moves the calling thread into the network namespace of process `pid` (setns;
    CAP_SYS_ADMIN): only a thread that runs nothing else afterwards may call it."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns: {os.strerror(error)}")
    finally:
        os.close(fd)


def connect_in_netns(pid: int, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port inside the network namespace of process `pid` (a
    container's), so it works for containers with network none, as kubelet's port-forward
    does. A dedicated thread enters the namespace (setns; CAP_SYS_ADMIN), creates and connects
    the socket, and ends: the namespace a socket was created in stays its own, and no pooled
    thread is ever left inside a container's namespace."""
    result: Future[socket.socket] = Future()

    def work() -> None:
        try:
            enter_net_namespace(pid)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            result.set_result(sock)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.set_exception(exc)

    thread = threading.Thread(target=work, name=f"netns-{pid}", daemon=True)
    thread.start()
    thread.join()
    return result.result()
