"""Servers under test, each in its own process: `python -m bench.servers KIND`.

The gRPC kinds (echo; registry, the fleet figures' floor in bench/fleetfloor.py; controlplane)
run alone in a fresh interpreter with the same gRPC server options and are driven by the same
client processes (bench.load), so the control plane's figure and the raw echo floor differ only
in what the server does per call; `relay` is a bare spliced TCP relay (the tunnels' ceiling);
`daemon` a provider daemon. Each prints one JSON line with its port (and what a client needs)
when ready, and exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
# Bidirectional: every message comes back as it is (the floor of a relay built on grpc.aio).
ECHO_STREAM_METHOD = f"/{ECHO_SERVICE}/EchoStream"
# The pipe each bare relay thread moves bytes through (as messaging.rawpath's).
RELAY_PIPE = 1024 * 1024
# The control plane's own options (controlplane/server.py), so both servers are configured alike.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_send_message_length", 4 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.http2.max_frame_size", 1 << 20),
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]


async def _echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _echo_stream(
    requests: AsyncIterator[bytes], context: aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


@asynccontextmanager
async def echo_server() -> AsyncIterator[dict[str, Any]]:
    """A bare grpc.aio server whose one method returns the request bytes."""
    server = aio.server(options=SERVER_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(_echo)  # no (de)serializers: raw bytes
    stream = grpc.stream_stream_rpc_method_handler(_echo_stream)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE, {"Echo": handler, "EchoStream": stream}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield {"port": port}
    finally:
        await server.stop(0)


@asynccontextmanager
async def registry_server() -> AsyncIterator[dict[str, Any]]:
    """A bare grpc.aio server answering RegisterHost and Connect's hello with fixed replies
    (the floor of a fleet connecting: what gRPC and the simulators cost)."""
    from bench.fleetfloor import registry_handlers

    server = aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((registry_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield {"port": port}
    finally:
        await server.stop(0)


@asynccontextmanager
async def control_plane(args: argparse.Namespace) -> AsyncIterator[dict[str, Any]]:
    """The real control plane on SQLite, with the bootstrap admin key for callers."""
    from pydantic import SecretStr

    from controlplane.server import ControlPlane, settle_heap
    from controlplane.settings import Settings

    data_dir = Path(args.data_dir)
    settings = Settings(
        data_dir=data_dir,
        database_url=args.database_url or "",
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        nats_url=args.nats_url,
        s3_endpoint=args.s3_endpoint,
        s3_access_key=args.s3_access_key,
        s3_secret_key=SecretStr(args.s3_secret_key),
        log_level="WARNING",
        allow_plaintext=True,  # loopback benchmark
    )
    plane = ControlPlane(settings)
    await plane.start()
    settle_heap()  # as `gpuplane controlplane serve` does
    try:
        key = (data_dir / "admin.key").read_text().strip()
        yield {"port": plane.port, "admin_key": key, "metrics_port": plane.metrics_port}
    finally:
        await plane.stop(grace=0)


def _splice_one_way(src: socket.socket, dst: socket.socket) -> None:
    """src → dst with splice(2) through one pipe until end-of-file: the least a relay does."""
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, RELAY_PIPE)
        while moved := os.splice(src.fileno(), write_end, RELAY_PIPE):
            while moved:
                moved -= os.splice(read_end, dst.fileno(), moved)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        os.close(read_end)
        os.close(write_end)


@asynccontextmanager
async def relay_server(target: str) -> AsyncIterator[dict[str, Any]]:
    """A bare TCP relay: each accepted connection is joined to a new one to `target`
    (host:port) by two threads moving bytes with splice(2), no framing, no event loop."""
    host, _, port = target.rpartition(":")
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                near, _ = listener.accept()
                far = socket.create_connection((host, int(port)))
            except OSError:
                return
            for sock in (near, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=_splice_one_way, args=(src, dst), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield {"port": listener.getsockname()[1]}
    finally:
        listener.close()


@asynccontextmanager
async def daemon(args: argparse.Namespace) -> AsyncIterator[dict[str, Any]]:
    """A provider daemon (registered and connected) in a process of its own, as in production:
    what it does per request then runs beside the bench's client, not on its event loop."""
    from pydantic import SecretStr

    from controlplane.server import settle_heap
    from daemon.agent import Agent
    from daemon.settings import DaemonSettings

    agent = Agent(
        DaemonSettings(
            control_plane=args.control_plane,
            plaintext=True,
            registration_token=SecretStr(sys.stdin.readline().strip()),
            data_dir=Path(args.data_dir),
            simulate_gpus=args.simulate_gpus,
            gpu_device_requests="always",
            docker_host=args.docker_host,
            max_concurrent_jobs=args.max_concurrent_jobs,
        )
    )
    await agent.start()
    settle_heap()
    try:
        yield {"started": True}
    finally:
        await agent.stop()


async def _serve(args: argparse.Namespace) -> None:
    if args.kind == "relay":
        server = relay_server(args.target)
    elif args.kind == "daemon":
        server = daemon(args)
    elif args.kind == "registry":
        server = registry_server()
    else:
        server = echo_server() if args.kind == "echo" else control_plane(args)
    async with server as ready:
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        # Runs until the parent closes our stdin (or dies).
        await asyncio.to_thread(sys.stdin.read)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.servers")
    parser.add_argument("kind", choices=["echo", "registry", "controlplane", "relay", "daemon"])
    parser.add_argument("--target", default="", help="relay: host:port to relay to")
    # daemon (its registration token is the first line on stdin)
    parser.add_argument("--control-plane", default="")
    parser.add_argument("--simulate-gpus", default="")
    parser.add_argument("--docker-host", default="")
    parser.add_argument("--max-concurrent-jobs", type=int, default=8)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--s3-endpoint", default="127.0.0.1:8333")
    parser.add_argument("--s3-access-key", default="")
    parser.add_argument("--s3-secret-key", default="")
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
