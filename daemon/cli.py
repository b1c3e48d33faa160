"""`gpuplane daemon run | install`: the daemon under GPUPLANE_DAEMON_* settings, or its setup."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

from docker.errors import DockerException
from pydantic import SecretStr, ValidationError

from daemon import install
from daemon.channel import ChannelConfigError
from daemon.gpus import NoGpuError, UnknownGpuModel
from daemon.identity import RegistrationError
from daemon.metrics import DaemonMetrics, MetricsAddrError
from daemon.settings import DaemonSettings
from messaging.dirlock import DirLocked, lock_dir
from messaging.envcheck import warn_unknown_settings
from messaging.jsonlog import formatter
from messaging.tls import TlsConfigError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
MICRO = Decimal(1_000_000)
LOCK_FILE = "daemon.lock"
log = logging.getLogger(__name__)


def price_micro_credits(text: str) -> int:
    """Credits per GPU-hour ("2.5") to integer micro-credits (2_500_000), exactly, via Decimal."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal number of credits") from None
    micro = amount * MICRO
    if not amount.is_finite() or micro <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the price must be more than 0")
    if micro != micro.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r} has more than 6 decimal places")
    return int(micro)


def label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


# flag destination → settings field, for flags that map one to one.
_FIELDS = {
    "control_plane": "control_plane",
    "tls_ca_file": "tls_ca_file",
    "tls_cert_file": "tls_cert_file",
    "tls_key_file": "tls_key_file",
    "data_dir": "data_dir",
    "simulate_gpus": "simulate_gpus",
    "price_per_gpu_hour": "price_per_gpu_hour_micro_credits",
    "location": "location",
    "docker_host": "docker_host",
    "token_file": "registration_token_file",
    "gpu_device_requests": "gpu_device_requests",
    "nats_url": "nats_url",
    "log_level": "log_level",
    "metrics_addr": "metrics_addr",
    "log_format": "log_format",
}


def add_daemon_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `run` to the `gpuplane daemon` group; every flag overrides its GPUPLANE_DAEMON_ env."""
    text = "run the provider daemon until SIGINT/SIGTERM (settings from GPUPLANE_DAEMON_* env)"
    run = subparsers.add_parser("run", help=text, description=text)
    run.set_defaults(handler=lambda args, ctx: run_daemon(args))
    add = run.add_argument
    add("--env-file", default=argparse.SUPPRESS, help="read settings from this KEY=VALUE file")
    add("--control-plane", metavar="HOST:PORT", help="control plane gRPC address")
    add("--plaintext", action="store_true", default=None, help="no TLS to the control plane (dev)")
    add("--tls-ca-file", type=Path, metavar="PEM", help="CA verifying the control plane")
    add("--tls-cert-file", type=Path, metavar="PEM", help="client certificate (client auth)")
    add("--tls-key-file", type=Path, metavar="PEM", help="key of --tls-cert-file")
    add(
        "--token",
        help="host registration token (needed until DATA_DIR/host.json exists); prefer "
        "--token-file or the environment: a flag's value is visible to every user in ps",
    )
    add("--token-file", type=Path, metavar="FILE", help="file holding the registration token")
    add("--data-dir", type=Path, help="identity, journal and job work dirs")
    add("--simulate-gpus", metavar="SPEC", help="e.g. 4xA100-80GB (hosts without NVIDIA GPUs)")
    add("--price-per-gpu-hour", type=price_micro_credits, metavar="CREDITS", help="e.g. 2.5")
    add("--location", help="where the host is, e.g. eu-west")
    add("--label", type=label, action="append", metavar="KEY=VALUE", help="repeatable")
    add("--docker-host", metavar="URL", help="Docker engine; default: the environment's")
    add("--gpu-device-requests", choices=["auto", "always", "never"])
    add("--nats-url", help="NATS server(s), comma-separated; default: from registration")
    add("--log-level")
    add("--metrics-addr", metavar="HOST:PORT", help="serve Prometheus /metrics there (off)")
    add("--log-format", choices=["text", "json"], help="json: one object per line")
    return run  # type: ignore[no-any-return]


def add_install_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `install` to the `gpuplane daemon` group (see daemon/install.py)."""
    text = "install the daemon on this GPU host: checks, virtualenv, config, systemd service"
    parser = subparsers.add_parser("install", help=text, description=text)
    install.add_arguments(parser)
    parser.set_defaults(handler=lambda args, ctx: install_daemon(args))
    return parser  # type: ignore[no-any-return]


def install_daemon(args: argparse.Namespace) -> int:
    try:
        return install.install(args)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def settings_from_args(args: argparse.Namespace) -> DaemonSettings:
    """Flags given on the command line win over the environment; the rest comes from it."""
    overrides: dict[str, Any] = {}
    for flag, field in _FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    # A flag wins over the environment, whichever way each gives the token.
    if getattr(args, "token", None):
        overrides["registration_token"] = SecretStr(args.token)
        overrides["registration_token_file"] = None
    elif getattr(args, "token_file", None):
        overrides["registration_token"] = None
    if getattr(args, "plaintext", None):
        overrides["plaintext"] = True
    if getattr(args, "label", None):
        overrides["labels"] = dict(args.label)
    return DaemonSettings(**overrides)


def run_daemon(args: argparse.Namespace) -> int:
    """Builds the settings, runs the agent until SIGINT/SIGTERM; returns the exit code."""
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        print(f"error: invalid daemon settings: {problems}", file=sys.stderr)
        return EXIT_USAGE
    console = logging.StreamHandler()
    console.setFormatter(formatter(settings.log_format))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[console])
    warn_unknown_settings(os.environ, DaemonSettings, "daemon")
    lock = lock_data_dir(settings.data_dir)
    if lock is None:
        return EXIT_USAGE
    try:
        asyncio.run(_serve(settings))
    except (
        NoGpuError,
        UnknownGpuModel,
        RegistrationError,
        ChannelConfigError,
        TlsConfigError,
        MetricsAddrError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DockerException as exc:
        print(f"error: the Docker engine is not reachable: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        lock.close()
    return EXIT_OK


def lock_data_dir(data_dir: Path) -> IO[str] | None:
    """Holds DATA_DIR/daemon.lock for the life of this process, before anything reads the data
    dir or spends a registration token: two daemons must never serve one host. None, after
    saying why on stderr, when another process holds it or it cannot be made."""
    try:
        return lock_dir(data_dir, LOCK_FILE, mode=0o700)
    except DirLocked as locked:
        print(
            f"error: another daemon (pid {locked.holder_pid}) is running on the data dir "
            f"{data_dir.absolute()}; stop it or give this one another --data-dir",
            file=sys.stderr,
        )
    except OSError as exc:
        print(f"error: cannot lock the data dir {data_dir.absolute()}: {exc}", file=sys.stderr)
    return None


async def _serve(settings: DaemonSettings) -> None:
    from daemon.agent import Agent

    agent = Agent(settings)
    if settings.metrics_addr:
        agent.metrics = DaemonMetrics()
        agent.metrics.watch(agent)
        port = agent.metrics.serve(settings.metrics_addr)
        log.info("metrics on %s (port %d)", settings.metrics_addr, port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    starting = asyncio.create_task(agent.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start that failed raises here
            # Until a signal, or the agent gives up (its host revoked).
            ending = asyncio.create_task(agent.run_forever())
            await asyncio.wait({stopping, ending}, return_when=asyncio.FIRST_COMPLETED)
            ending.cancel()
        log.info("stopping: running containers are left to a restarted daemon")
    finally:
        for task in (starting, stopping):
            task.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        await agent.stop()
        if agent.metrics is not None:
            agent.metrics.stop()
    if agent.fatal:
        raise RegistrationError(agent.fatal)
