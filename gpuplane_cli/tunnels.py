"""`gpuplane exec`, `shell` and `port-forward`: bytes to and from a running workload, through
the control plane (TunnelService)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from gpuplane.v1 import tunnels_pb2, tunnels_pb2_grpc

from gpuplane_cli import args as a
from gpuplane_cli import rawforward
from gpuplane_cli.client import EXIT_USAGE, CliError, Context
from gpuplane_cli.terminal import CHUNK, StdinReader, raw_mode, terminal_size, write_out

T = tunnels_pb2
EXEC_EPILOG = """\
examples:
  gpuplane exec 3f9a -- nvidia-smi             run a command, print its output
  gpuplane exec 3f9a -i -- sh -c 'wc -l' < f   stdin forwarded (scripts)
  gpuplane exec 3f9a -it -- bash               an interactive terminal
the exit status is the command's own."""
FORWARD_EPILOG = """\
examples:
  gpuplane port-forward 3f9a 8888:8888         http://127.0.0.1:8888 reaches the container's 8888
  gpuplane port-forward --stdio 3f9a 22        stdin/stdout, for an OpenSSH ProxyCommand:
      ssh -o ProxyCommand='gpuplane port-forward --stdio 3f9a 22' root@job"""


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    run = a.add_leaf(
        subparsers,
        "exec",
        exec_command,
        "run a command in a running job's container (after --)",
        common,
        epilog=EXEC_EPILOG,
        formatter_class=raw,
    )
    run.add_argument("job_id", metavar="WORKLOAD", help="the job (or session) id or its start")
    run.add_argument("-i", "--stdin", action="store_true", help="forward stdin to the command")
    run.add_argument("-t", "--tty", action="store_true", help="a terminal (raw mode, resize)")
    shell = a.add_leaf(subparsers, "shell", shell_command, "an interactive /bin/sh", common)
    shell.add_argument("job_id", metavar="WORKLOAD", help="the job (or session) id or its start")
    forward = a.add_leaf(
        subparsers,
        "port-forward",
        port_forward,
        "reach a port inside a running job's container from 127.0.0.1",
        common,
        epilog=FORWARD_EPILOG,
        formatter_class=raw,
    )
    forward.add_argument("job_id", metavar="WORKLOAD", help="the job (or session) id or its start")
    forward.add_argument(
        "ports", metavar="LOCAL:REMOTE", help="local port (0: any free one) and container port"
    )
    forward.add_argument(
        "--stdio",
        action="store_true",
        help="one connection over stdin/stdout to the port given as LOCAL:REMOTE's place",
    )


def port_number(text: str, what: str, allow_zero: bool = False) -> int:
    try:
        port = int(text)
    except ValueError:
        raise CliError(f"{what}: {text!r} is not a port number", EXIT_USAGE) from None
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise CliError(f"{what}: {port} is outside {low}..65535", EXIT_USAGE)
    return port


def parse_ports(spec: str, stdio: bool) -> tuple[int, int]:
    """LOCAL:REMOTE (REMOTE alone: the same port locally); with --stdio just PORT."""
    if stdio:
        return 0, port_number(spec, "--stdio PORT")
    local, _, remote = spec.rpartition(":")
    if not local:
        local = remote
    return port_number(local, "LOCAL", allow_zero=True), port_number(remote, "REMOTE")


async def shell_command(args: argparse.Namespace, ctx: Context) -> int:
    args.job_command, args.stdin, args.tty = ["/bin/sh"], True, True
    return await exec_command(args, ctx)


async def exec_command(args: argparse.Namespace, ctx: Context) -> int:
    """Runs the command; returns its exit status."""
    command = list(getattr(args, "job_command", None) or [])
    if not command:
        raise CliError("give the command after --: gpuplane exec WORKLOAD -- CMD …", EXIT_USAGE)
    use_tty = bool(args.tty) and sys.stdin.isatty()
    rows, cols = terminal_size() if use_tty else (0, 0)
    start = T.ExecStart(
        job_id=args.job_id,
        command=command,
        tty=bool(args.tty),
        stdin=bool(args.stdin),
        size=T.TerminalSize(rows=rows, cols=cols),
    )
    outgoing: asyncio.Queue[T.ExecRequest] = asyncio.Queue(maxsize=4)
    loop = asyncio.get_running_loop()
    if use_tty:
        loop.add_signal_handler(signal.SIGWINCH, lambda: _resized(outgoing))
    feeder = asyncio.create_task(_feed_stdin(outgoing)) if args.stdin else None
    if feeder is None:
        outgoing.put_nowait(T.ExecRequest(stdin_closed=True))
    client = ctx.client()
    stub = tunnels_pb2_grpc.TunnelServiceStub(client.channel)
    code = 0
    try:
        with raw_mode(sys.stdin.fileno()) if use_tty else contextlib.nullcontext():
            call = stub.Exec(_requests(start, outgoing), metadata=client.metadata)
            async for response in call:
                kind = response.WhichOneof("msg")
                if kind == "stdout":
                    write_out(response.stdout, 1)
                elif kind == "stderr":
                    write_out(response.stderr, 2)
                elif kind == "exit_code":
                    code = response.exit_code
    finally:
        if use_tty:
            loop.remove_signal_handler(signal.SIGWINCH)
        if feeder is not None:
            feeder.cancel()
    return code if 0 <= code <= 255 else 1


def _resized(outgoing: asyncio.Queue[T.ExecRequest]) -> None:
    rows, cols = terminal_size()
    with contextlib.suppress(asyncio.QueueFull):  # a burst of resizes: the next one says it
        outgoing.put_nowait(T.ExecRequest(resize=T.TerminalSize(rows=rows, cols=cols)))


async def _feed_stdin(outgoing: asyncio.Queue[T.ExecRequest]) -> None:
    reader = StdinReader(sys.stdin.fileno())
    while data := await reader.read():
        await outgoing.put(T.ExecRequest(stdin=data))
    await outgoing.put(T.ExecRequest(stdin_closed=True))


async def _requests(
    start: T.ExecStart, outgoing: asyncio.Queue[T.ExecRequest]
) -> AsyncIterator[T.ExecRequest]:
    yield T.ExecRequest(start=start)
    while True:
        yield await outgoing.get()


async def port_forward(args: argparse.Namespace, ctx: Context) -> int:
    local, remote = parse_ports(args.ports, args.stdio)
    client = ctx.client()
    stub = tunnels_pb2_grpc.TunnelServiceStub(client.channel)

    async def tunnel(
        read: Callable[[], Awaitable[bytes]],
        write: Callable[[bytes], Awaitable[None]],
        close_write: Callable[[], Awaitable[None]],
    ) -> None:
        target = (args.job_id, remote)
        local = (read, write, close_write)
        await rawforward.forward(stub, client.metadata, client.target.security, target, local)

    if args.stdio:
        stdin = StdinReader(sys.stdin.fileno())

        async def to_stdout(data: bytes) -> None:
            write_out(data, 1)

        async def nothing() -> None:
            return None

        await tunnel(stdin.read, to_stdout, nothing)
        return 0
    return await _listen(args, ctx, local, tunnel)


async def _listen(
    args: argparse.Namespace, ctx: Context, local: int, tunnel: Callable[..., Awaitable[None]]
) -> int:
    """Serves 127.0.0.1:local until interrupted, one PortForward call per connection."""

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def write(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def close_write() -> None:
            if writer.can_write_eof():
                writer.write_eof()

        try:
            await tunnel(lambda: reader.read(CHUNK), write, close_write)
        except grpc.RpcError as exc:  # one connection's failure is said, not fatal
            why = f"{exc.code().name}: {exc.details()}"
            print(f"error: connection closed: {why}", file=sys.stderr, flush=True)
        except OSError as exc:
            print(f"error: connection closed: {exc}", file=sys.stderr, flush=True)
        finally:
            writer.close()

    server = await asyncio.start_server(accepted, "127.0.0.1", local)
    port = server.sockets[0].getsockname()[1]
    if ctx.json:
        print(f'{{"address": "127.0.0.1:{port}"}}', flush=True)
    else:
        print(f"forwarding 127.0.0.1:{port} -> {args.job_id}:{args.ports.rpartition(':')[2]}")
        sys.stdout.flush()
    async with server:
        await server.serve_forever()
    return 0
