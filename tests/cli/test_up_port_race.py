"""`gpuplane up` when its ports are taken between the probe and the bind: it picks others."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuplane_cli import up


@pytest.fixture
def taken() -> Iterator[tuple[int, int]]:
    """Two loopback ports someone else listens on."""
    sockets = [socket.socket(), socket.socket()]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    try:
        yield sockets[0].getsockname()[1], sockets[1].getsockname()[1]
    finally:
        for sock in sockets:
            sock.close()


async def test_ports_taken_after_the_probe_are_replaced(
    tmp_path: Path, taken: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, metrics_port = taken
    probed: list[int] = []
    real_probe = up.port_or_free

    def racy_probe(preferred: int) -> int:
        """Says free the first time (the port was taken just after), the truth then."""
        if preferred in probed:
            return real_probe(preferred)
        probed.append(preferred)
        return preferred

    monkeypatch.setattr(up, "port_or_free", racy_probe)
    stack = up.Stack(tmp_path / "stack", port, metrics_port)
    try:
        await stack.start({})
        assert stack.plane is not None
        assert stack.plane.port not in (0, port)
        assert stack.plane.metrics_port not in (0, metrics_port)
    finally:
        await stack.stop()
    assert sorted(probed) == sorted(taken)
