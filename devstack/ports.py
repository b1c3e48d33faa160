"""Free TCP ports on the loopback interface."""

from __future__ import annotations

import socket
from collections.abc import Collection

LOOPBACK = "127.0.0.1"


def _bind(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        sock.close()
        return None
    return sock


def free_ports(count: int, avoid: Collection[int] = ()) -> list[int]:
    """Returns `count` distinct ports, none in `avoid`, that were free on 127.0.0.1 a
    moment ago.

    All sockets stay bound until every port is chosen, so the ports are distinct. The
    caller's server binds them a moment later; the race with other processes is accepted.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = _bind(0)
            if sock is None:
                raise OSError("cannot bind a TCP socket on 127.0.0.1")
            held.append(sock)
            port = int(sock.getsockname()[1])
            if port not in avoid:
                ports.append(port)
        return ports
    finally:
        for sock in held:
            sock.close()


def free_port_pair(offset: int) -> tuple[int, int]:
    """Two free ports `offset` apart, for servers that derive one port from another."""
    for _ in range(100):
        first = _bind(0)
        if first is None:
            break
        with first:
            port = int(first.getsockname()[1])
            if port + offset > 65535:
                continue
            second = _bind(port + offset)
            if second is not None:
                second.close()
                return port, port + offset
    raise OSError(f"found no two free ports {offset} apart on 127.0.0.1")


def free_port() -> int:
    """Returns one port that was free on 127.0.0.1 a moment ago."""
    return free_ports(1)[0]
