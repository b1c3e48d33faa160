"""The bare relay behind relay_chain_throughput: bytes both ways, and end-of-file passed on."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench.resources import ServerProcess


async def _echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()  # until the relay passes the client's end-of-file on
    writer.write(data[::-1])
    writer.write_eof()
    await writer.drain()
    writer.close()


async def test_two_chained_relays_carry_bytes_both_ways_and_the_half_close(
    tmp_path: Path,
) -> None:
    server = await asyncio.start_server(_echo_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    relays = []
    try:
        for hop in range(2):
            relay = ServerProcess(
                "relay", tmp_path / f"relay-{hop}.log", f"--target=127.0.0.1:{port}"
            )
            relays.append(relay)
            port = (await relay.start())["port"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        payload = bytes(range(256)) * 4096  # 1 MiB: more than one pipe's worth per call
        writer.write(payload)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert answer == payload[::-1]
    finally:
        for relay in relays:
            await relay.stop()
        server.close()
        await server.wait_closed()
