"""`gpuplane up`: the embedded local stack (NATS, S3, control plane on SQLite) in one command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, EXIT_USAGE, CliError, Context, load_env_file
from gpuplane_cli.serve import configure_logging
from messaging.dirlock import DirLocked, lock_dir
from messaging.tasks import timed

if TYPE_CHECKING:
    from controlplane.server import ControlPlane
    from devstack import NatsServer, S3Server
    from gpuplane_cli.stackinfo import DemoKeys

DEFAULT_DATA_DIR = ".gpuplane"
DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464
DEFAULT_DASHBOARD_PORT = 8080
ENV_FILE = "gpuplane.env"
STOP_TIMEOUT = 15.0

log = logging.getLogger(__name__)


def register(subparsers: a.Subparsers) -> None:
    up = subparsers.add_parser(
        "up",
        help="run a whole local stack: control plane, NATS, S3 (and with --demo a daemon)",
        description="Starts NATS, an S3 server and the control plane (SQLite) on loopback, "
        "creates demo tenants and keys, writes DATA_DIR/gpuplane.env and runs until Ctrl-C.",
    )
    up.add_argument("--data-dir", type=Path, default=Path(DEFAULT_DATA_DIR))
    up.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="gRPC port; another if busy (default 50051)"
    )
    up.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    up.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        help="web dashboard port on 127.0.0.1; another if busy (default 8080)",
    )
    up.add_argument("--log-level", default="INFO", help="of DATA_DIR/logs/gpuplane.log")
    up.add_argument(
        "--demo",
        action="store_true",
        help="also run a local daemon and a demo job end to end, printing its output and cost",
    )
    up.add_argument("--exit", action="store_true", help="with --demo: stop once the demo is done")
    up.set_defaults(handler=run_up)


def port_or_free(preferred: int) -> int:
    """`preferred` when nothing listens on it on loopback, else 0 (the server picks one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return 0
    return preferred


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Holds DATA_DIR/up.lock for the life of this process: one stack per data dir."""
    try:
        return lock_dir(data_dir, "up.lock")
    except DirLocked as locked:
        raise CliError(
            f"a stack is already running in {data_dir} (pid {locked.holder_pid}); "
            "stop it or use --data-dir",
            EXIT_USAGE,
        ) from None


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """Writes KEY=VALUE lines with mode 0600 from the first byte, replacing atomically."""
    lines = [
        "# gpuplane up: the local stack's address and keys. Use it in a shell with:",
        f"#   set -a; . {path}; set +a",
        *(f"{key}={value}" for key, value in values.items()),
    ]
    partial = path.with_name(path.name + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    os.chmod(partial, 0o600)
    partial.replace(path)


class Stack:
    """The servers of `gpuplane up`, started in order and stopped in reverse."""

    def __init__(
        self, data_dir: Path, port: int, metrics_port: int, dashboard_port: int = 0
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.metrics_port = metrics_port
        self.dashboard_port = dashboard_port  # 0: any free one
        self.nats: NatsServer | None = None
        self.s3: S3Server | None = None
        self.plane: ControlPlane | None = None
        self.admin_key = ""
        # Stopped first, newest first: what was started on top of the stack (the demo daemon).
        self.on_stop: list[Callable[[], Awaitable[None]]] = []

    @property
    def addr(self) -> str:
        assert self.plane is not None
        return f"127.0.0.1:{self.plane.port}"

    async def start(self, known: dict[str, str]) -> None:
        from devstack import DevstackError, NatsServer, S3Server, stop_leftovers

        try:
            leftovers = await asyncio.to_thread(stop_leftovers, self.data_dir)
        except DevstackError as exc:
            raise CliError(str(exc)) from None
        if leftovers:
            names = ", ".join(str(leftover) for leftover in leftovers)
            print(f"stopped servers an earlier run left running: {names}", flush=True)
        self.nats = NatsServer(self.data_dir / "nats")
        self.s3 = S3Server(self.data_dir / "s3", buckets=["gpuplane"])
        try:
            await asyncio.gather(
                asyncio.to_thread(self.nats.start), asyncio.to_thread(self.s3.start)
            )
        except DevstackError as exc:
            raise CliError(str(exc)) from None
        await self._start_control_plane(known.get("GPUPLANE_ADMIN_API_KEY"))

    async def _start_control_plane(self, admin_key: str | None) -> None:
        from pydantic import SecretStr

        from controlplane.server import ControlPlane
        from controlplane.settings import Settings

        assert self.nats is not None
        assert self.s3 is not None
        for attempt in (port_or_free(self.port), 0):
            settings = Settings(
                data_dir=self.data_dir,
                database_url="",
                listen_addr=f"127.0.0.1:{attempt}",
                metrics_addr=f"127.0.0.1:{port_or_free(self.metrics_port)}",
                dashboard_address=f"127.0.0.1:{self._free_dashboard_port()}",
                nats_url=self.nats.url,
                s3_endpoint=self.s3.endpoint,
                s3_access_key=self.s3.access_key,
                s3_secret_key=SecretStr(self.s3.secret_key),
                s3_bucket="gpuplane",
                allow_simulated_by_default=True,
                # A dev stack's hosts are simulated, or real and not yet verified.
                allow_unverified_by_default=True,
                allow_plaintext=True,  # a dev stack on loopback
                bootstrap_admin_key=SecretStr(admin_key) if admin_key else None,
                shutdown_grace_seconds=2.0,
            )
            plane = ControlPlane(settings)
            try:
                await plane.start()
            except OSError:
                await plane.stop(grace=0)
                if attempt == 0:
                    raise
                continue
            self.plane = plane
            break
        self.admin_key = admin_key or self._read_admin_key()

    def _free_dashboard_port(self) -> int:
        return port_or_free(self.dashboard_port) if self.dashboard_port else 0

    def _read_admin_key(self) -> str:
        key_file = self.data_dir / "admin.key"
        if not key_file.exists():
            raise CliError(
                f"the database in {self.data_dir} has an admin key, but neither {key_file} nor "
                f"{self.data_dir / ENV_FILE} holds it; remove {self.data_dir} to start afresh"
            )
        return key_file.read_text().strip()

    async def stop(self) -> None:
        """Stops everything, newest first; each step's time goes to the log ("stopping: the
        control plane took 0.52s"), so that a slow stop says which step was slow."""
        while self.on_stop:  # each step times its own parts
            await self.on_stop.pop()()
        if self.plane is not None:
            with timed(log, "stopping: the control plane"):
                try:
                    await asyncio.wait_for(self.plane.stop(grace=1.0), STOP_TIMEOUT)
                except TimeoutError:
                    log.warning("the control plane did not stop within %.0fs", STOP_TIMEOUT)
            self.plane = None
        for server in (self.s3, self.nats):
            if server is not None:
                with timed(log, f"stopping: {server.name}"):
                    await asyncio.to_thread(server.stop)
        self.s3 = self.nats = None


async def _demo_until_stopped(stack: Stack, keys: DemoKeys, stop: asyncio.Event) -> None:
    """Runs the demo; Ctrl-C during it cancels it (the stack then stops as usual)."""
    from gpuplane_cli import demo

    running = asyncio.create_task(demo.run_demo(stack, keys))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not running.done():
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    if not running.cancelled():
        running.result()  # the demo's error, if it failed


async def run_up(args: argparse.Namespace, ctx: Context) -> int:
    from gpuplane_cli import stackinfo

    if args.exit and not args.demo:
        raise CliError("--exit is only meaningful with --demo", EXIT_USAGE)
    started = time.monotonic()
    data_dir: Path = args.data_dir.expanduser().resolve()
    lock = lock_data_dir(data_dir)
    configure_logging(args.log_level, data_dir / "logs" / "gpuplane.log")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    env_path = data_dir / ENV_FILE
    known: dict[str, str] = {}
    if env_path.exists():
        load_env_file(str(env_path), known, override=True)
    stack = Stack(data_dir, args.port, args.metrics_port, args.dashboard_port)
    try:
        print(f"starting the local stack in {data_dir} …", flush=True)
        await stack.start(known)
        if stop.is_set():
            return EXIT_OK
        keys = await stackinfo.ensure_demo_keys(stack.addr, stack.admin_key, known)
        write_env_file(env_path, stackinfo.env_values(stack.addr, stack.admin_key, keys))
        print(stackinfo.banner(stack, keys, env_path, time.monotonic() - started), flush=True)
        if args.demo and not stop.is_set():
            await _demo_until_stopped(stack, keys, stop)
            if args.exit:
                return EXIT_OK
        if not stop.is_set():
            print("Ctrl-C stops everything.", flush=True)
        await stop.wait()
        print("stopping …", flush=True)
        return EXIT_OK
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await stack.stop()
        lock.close()
        print("stopped.", flush=True)
