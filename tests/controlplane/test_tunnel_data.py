"""The tunnel data port on its own: tokens claimed once, pairs spliced both ways with half-closes,
held bytes and back-pressure, standing pools, TLS with the API's certificate."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from controlplane.tunnels.data import DataPort, arrival, server_context
from daemon.channel import ChannelSecurity
from devstack.certs import TestCerts
from messaging.rawpath import HIGH_WATER, Refused, connect, pair, spliced

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def port() -> AsyncIterator[DataPort]:
    data = DataPort(None, claim_timeout=0.5)
    await data.start("127.0.0.1:0")
    yield data
    await data.stop()


def token() -> str:
    return secrets.token_urlsafe(24)


async def joined(data: DataPort, context: object = None, name: str = "") -> tuple:  # type: ignore[type-arg]
    """Two connections presenting their tokens, spliced: (a's streams, b's streams, done)."""
    address = f"127.0.0.1:{data.port}"
    one, two = token(), token()
    first, second = data.expect(one), data.expect(two)
    a = await connect(address, one, context, name)  # type: ignore[arg-type]
    b = await connect(address, two, context, name)  # type: ignore[arg-type]
    left, right = await first, await second
    pair(left, right)
    return a, b, asyncio.create_task(spliced(left, right))


async def test_bytes_go_both_ways_and_half_closes_pass(port: DataPort) -> None:
    (ar, aw), (br, bw), done = await joined(port)
    aw.write(b"hello")
    assert await br.readexactly(5) == b"hello"
    aw.write_eof()  # a says no more; b still can
    assert await br.read() == b""
    bw.write(b"answer")
    bw.write_eof()
    assert await ar.read() == b"answer"
    await asyncio.wait_for(done, 5)  # both ways done: both connections closed
    aw.close()
    bw.close()


async def test_tokens_are_good_once_and_strangers_get_nothing(port: DataPort) -> None:
    address = f"127.0.0.1:{port.port}"
    good = token()
    waiting = port.expect(good)
    with pytest.raises(Refused):
        await connect(address, token(), None)
    reader, writer = await connect(address, good, None)
    with pytest.raises(Refused):
        await connect(address, good, None)
    assert (await waiting).token == good
    # Silence (no token within the claim time) is closed too, without a byte.
    silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port.port)
    assert await asyncio.wait_for(silent_reader.read(), 5) == b""
    assert port.refused == 3
    # A token forgotten before its connection came is as unknown as a wrong one.
    late = token()
    port.expect(late)
    port.forget(late)
    with pytest.raises(Refused):
        await connect(address, late, None)
    for w in (writer, silent_writer):
        w.close()


async def test_bytes_before_a_peer_are_held_up_to_the_mark(port: DataPort) -> None:
    """A side that writes before it is paired is held up to HIGH_WATER, then its reads
    pause (its sender's writes back up in the kernel); pairing delivers every byte."""
    address = f"127.0.0.1:{port.port}"
    one, two = token(), token()
    first, second = port.expect(one), port.expect(two)
    _, aw = await connect(address, one, None)
    early = bytes(range(256)) * (4 * HIGH_WATER // 256)
    aw.write(early)
    left = await first
    await asyncio.sleep(0.3)
    assert len(left.held) <= HIGH_WATER + 256 * 1024  # one read past the mark at most
    br, bw = await connect(address, two, None)
    pair(left, await second)
    aw.write_eof()
    got = await asyncio.wait_for(br.read(), 10)
    assert got == early
    aw.close()
    bw.close()


async def test_a_stalled_reader_stalls_the_writer(port: DataPort) -> None:
    (_, aw), (br, bw), _ = await joined(port)
    written = 0

    async def flood() -> None:
        nonlocal written
        while True:
            aw.write(bytes(256 * 1024))
            await aw.drain()
            written += 256 * 1024

    task = asyncio.create_task(flood())
    await asyncio.sleep(1.0)
    stalled = written
    await asyncio.sleep(0.5)
    assert written == stalled
    assert written < 64 * 1024 * 1024  # socket buffers and one 1 MiB mark, no more
    task.cancel()
    assert len(await br.read(1 << 20)) > 0
    aw.close()
    bw.close()


async def test_a_standing_pool_takes_idle_connections_and_ends_when_one_is_let_go(
    port: DataPort,
) -> None:
    address = f"127.0.0.1:{port.port}"
    pool = port.standing(token(), 2)
    conns = [await connect(address, pool.token, None) for _ in range(2)]
    with pytest.raises(Refused):  # no more than its limit
        await connect(address, pool.token, None)
    taken = await pool.take(1.0)
    assert taken is not None
    conns[0][1].close()
    conns[1][1].close()  # an idle one let go: its daemon stopped keeping the pool
    for _ in range(50):
        if pool.closed:
            break
        await asyncio.sleep(0.02)
    assert pool.closed
    assert await pool.take(1.0) is None
    taken.close()


async def test_tls_with_the_apis_certificate(test_certs: TestCerts) -> None:
    context = server_context(test_certs.server_cert, test_certs.server_key, test_certs.ca_cert)
    data = DataPort(context)
    await data.start("127.0.0.1:0")
    client = ChannelSecurity(
        ca_file=test_certs.ca_cert,
        cert_file=test_certs.client_cert,
        key_file=test_certs.client_key,
    ).raw_context()
    try:
        (ar, aw), (br, bw), _ = await joined(data, client, "localhost")
        aw.write(b"over tls")
        assert await br.readexactly(8) == b"over tls"
        bw.write(b"back")
        assert await ar.readexactly(4) == b"back"
        # Without a client certificate the handshake fails: the API requires them.
        bare = ChannelSecurity(ca_file=test_certs.ca_cert).raw_context()
        with pytest.raises((Refused, OSError)):
            await connect(f"127.0.0.1:{data.port}", token(), bare, "localhost")
        aw.close()
        bw.close()
    finally:
        await data.stop()


async def test_an_expected_connection_that_never_comes(port: DataPort) -> None:
    assert await arrival(port.expect(token()), 0.1) is None
