"""Connections into a container's network namespace from one dedicated thread per container, so
a connection costs a queue hand-off and a connect, not a thread and a setns of its own."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading

from daemon.exec_io import enter_net_namespace

# How long a connect inside the container may take.
CONNECT_TIMEOUT = 5.0
Request = tuple[int, asyncio.AbstractEventLoop, "asyncio.Future[socket.socket]"]


class Connector:
    """A thread that enters the network namespace of process `pid` (a container's) once and
    then only creates and connects sockets there, one request at a time, until `close`: it
    never runs anything else, so nothing else runs in the container's namespace (the same
    rule as daemon/exec_io.connect_in_netns). CAP_SYS_ADMIN, as that."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._requests: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"netns-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            enter_net_namespace(self.pid)
        except OSError as exc:
            self._failed = exc
        while (request := self._requests.get()) is not None:
            port, loop, future = request
            try:
                if self._failed is not None:
                    raise self._failed
                sock = _connect(port)
            except OSError as exc:
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, sock, None)

    async def connect(self, port: int) -> socket.socket:
        """A non-blocking TCP connection to 127.0.0.1:port in the namespace."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[socket.socket] = loop.create_future()
        self._requests.put((port, loop, future))
        return await future

    def close(self) -> None:
        self._requests.put(None)


def _connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _settle(
    future: asyncio.Future[socket.socket], sock: socket.socket | None, error: OSError | None
) -> None:
    if future.done():  # the caller gave up: the connection is not wanted
        if sock is not None:
            sock.close()
    elif error is not None:
        future.set_exception(error)
    else:
        assert sock is not None
        future.set_result(sock)
