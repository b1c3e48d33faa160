"""The gRPC server outlives what makes grpc.aio stop it by itself: a request whose HTTP/2
`:path` is not UTF-8, which any client can send, fails grpc.aio's loop accepting calls and
grpc.aio then shuts the whole server down (controlplane/api/keeper.py)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from gpuplane.v1 import admin_pb2, admin_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.api.keeper import KeptServer, _running
from controlplane.api.registration import GenericHandler
from controlplane.settings import Settings
from daemon.channel import PLAINTEXT, ChannelSecurity, open_channel
from devstack.certs import TestCerts
from devstack.factories import bearer
from tests.controlplane.browser import OK, Browser, dashboard_url
from tests.controlplane.conftest import sqlite_settings
from tests.harness import JobPlane, open_plane


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK header field, literal and not indexed (RFC 7541 §6.2.2), short strings."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """An HTTP/2 frame (RFC 9113 §4.1): 24-bit length, type, flags, stream id, payload."""
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return header + struct.pack(">I", stream) + payload


async def send_request_with_path(
    port: int, path: bytes, tls: ssl.SSLContext | None = None
) -> asyncio.StreamWriter:
    """Opens an HTTP/2 connection (over TLS with `tls`) and sends one gRPC request's headers
    with `path`, as no gRPC client library would; returns the connection, held open as a
    hostile client may."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    headers = b"".join(
        _literal(name, value)
        for name, value in (
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", b"127.0.0.1"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        )
    )
    settings = _frame(0x4, 0, 0, b"")
    request = _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS, stream 1
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + request)
    await writer.drain()
    return writer


async def who_am_i(channel: grpc.aio.Channel, key: str) -> str:
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    reply = await stub.WhoAmI(
        admin_pb2.WhoAmIRequest(), metadata=bearer(key), timeout=10, wait_for_ready=True
    )
    return reply.tenant_id


async def restarted(plane: JobPlane, times: int) -> None:
    """Waits (5 s at most) for the plane's gRPC server to have been served again `times`."""
    deadline = time.monotonic() + 5
    while plane.plane.server is None or plane.plane.server.restarts < times:
        assert time.monotonic() < deadline, f"not served again a {times}. time within 5 s"
        await asyncio.sleep(0.05)


def restarts_exported(plane: JobPlane) -> float:
    url = f"http://127.0.0.1:{plane.plane.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - our own loopback
        text = reply.read().decode()
    line = next(x for x in text.splitlines() if x.startswith("gpuplane_grpc_server_restarts"))
    return float(line.split()[-1])


async def test_a_request_whose_path_is_not_utf8_does_not_stop_the_server(
    tmp_path: Path,
) -> None:
    settings = sqlite_settings(tmp_path / "cp", dashboard_address="127.0.0.1:0")
    async with (
        open_plane(settings, expect_grpc_restarts=True) as plane,
        Browser(dashboard_url(plane)) as browser,
    ):
        admin = await who_am_i(plane.channel, plane.admin_key)
        assert admin
        assert (await browser.login(plane.admin_key))[0] == 200
        watching = open_channel(plane.address, PLAINTEXT)  # outlives the plane's own
        watch = health_pb2_grpc.HealthStub(watching).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        hostile = await send_request_with_path(plane.plane.port, b"/gpuplane.v1.\xff\xfe/X")
        # A fresh server answers on the same port (and on the dashboard's private one) soon
        # after, while the hostile client still holds its connection...
        await restarted(plane, 1)
        fresh = open_channel(plane.address, PLAINTEXT)
        try:
            assert await who_am_i(fresh, plane.admin_key) == admin
        finally:
            await fresh.close(None)
        assert await who_am_i(plane.channel, plane.admin_key) == admin
        assert (await browser.call("AdminService/WhoAmI", admin_pb2.WhoAmIRequest())).code == OK
        assert plane.plane.server is not None
        assert plane.plane.server.restarts == 1
        assert [type(e) for e in plane.plane.server.failures] == [UnicodeDecodeError]
        assert restarts_exported(plane) == 1
        # ...and the stream open before is still served, by the server that stopped.
        await plane.plane.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        got = await asyncio.wait_for(watch.read(), 10)
        assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await plane.plane.health.set("", health_pb2.HealthCheckResponse.SERVING)
        hostile.close()

        # Again: each time.
        hostile = await send_request_with_path(plane.plane.port, b"/\xc3(")
        hostile.close()
        await restarted(plane, 2)
        assert await who_am_i(plane.channel, plane.admin_key) == admin
        assert [type(e) for e in plane.plane.server.failures] == [UnicodeDecodeError] * 2
    # The stopped servers closed with the plane: the stream ended then (after the last
    # statuses it was sent).
    try:
        ended: object = None
        while ended is None or isinstance(ended, health_pb2.HealthCheckResponse):
            ended = await asyncio.wait_for(watch.read(), 10)
    except grpc.aio.AioRpcError as error:
        ended = error.code()
    finally:
        await watching.close(None)
    assert ended in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert plane.plane.grpc_restarts == 2


async def test_a_tls_server_is_served_again_with_its_certificate(
    tmp_path: Path, test_certs: TestCerts
) -> None:
    """The public API over TLS without client certificates (consumers hold API keys, not
    certificates): anyone who completes a handshake can send the request."""
    settings = Settings(
        data_dir=tmp_path / "cp",
        listen_addr="127.0.0.1:0",
        metrics_addr="",
        tls_cert_file=test_certs.server_cert,
        tls_key_file=test_certs.server_key,
    )
    security = ChannelSecurity(ca_file=test_certs.ca_cert)
    async with open_plane(settings, security, expect_grpc_restarts=True) as plane:
        admin = await who_am_i(plane.channel, plane.admin_key)
        tls = ssl.create_default_context(cafile=str(test_certs.ca_cert))
        tls.set_alpn_protocols(["h2"])
        hostile = await send_request_with_path(plane.plane.port, b"/\xff", tls)
        await restarted(plane, 1)
        assert await who_am_i(plane.channel, plane.admin_key) == admin
        fresh = open_channel(plane.address, security)
        try:
            assert await who_am_i(fresh, plane.admin_key) == admin
        finally:
            await fresh.close(None)
        assert plane.plane.server is not None
        assert [type(e) for e in plane.plane.server.failures] == [UnicodeDecodeError]
        hostile.close()


class Pong(GenericHandler):
    """Answers any unary method with b"pong" (raw bytes: no serializers)."""

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        async def pong(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return b"pong"

        return grpc.unary_unary_rpc_method_handler(pong)


async def test_a_port_taken_meanwhile_is_bound_again_once_free() -> None:
    """Between the stop and the restart another process listens on the port: the keeper
    retries with a backoff and serves again once the port is free."""
    keeper = KeptServer([], [("grpc.so_reuseport", 0)], check_interval=1.0)
    keeper.registrar().add_generic_rpc_handlers((Pong(),))
    port = keeper.add_port("127.0.0.1:0")
    await keeper.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    ping = channel.unary_unary("/x.Y/Ping", bytes, bytes)
    squatter = socket.socket()
    try:
        assert await ping(b"", timeout=5) == b"pong"
        hostile = await send_request_with_path(port, b"/\xff")
        deadline = time.monotonic() + 3
        while True:  # the listener closes as grpc.aio stops the server: the port is free
            try:
                squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the port stayed taken"
                await asyncio.sleep(0.01)
        squatter.listen()
        while keeper.restarts < 1:
            assert time.monotonic() < deadline + 2, "not noticed"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # its binds fail meanwhile
        assert not _running(keeper.server)
        squatter.close()
        assert await ping(b"", timeout=10, wait_for_ready=True) == b"pong"
        assert keeper.restarts == 1
        assert _running(keeper.server)
        hostile.close()
    finally:
        squatter.close()
        await channel.close(None)
        await keeper.stop(0)
