"""`gpuplane controlplane serve` and `gpuplane daemon run|install`: the long-running processes."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, EXIT_UNIMPLEMENTED, EXIT_USAGE, CliError, Context

if TYPE_CHECKING:
    from messaging.jsonlog import LogFormat

DAEMON_CLI = "daemon.cli"


def register(subparsers: a.Subparsers, want_daemon: bool) -> None:
    env_file = argparse.ArgumentParser(add_help=False)
    env_file.add_argument(
        "--env-file", default=argparse.SUPPRESS, help="read GPUPLANE_* settings from this file"
    )
    plane = a.add_group(subparsers, "controlplane", "the control plane server")
    serve = a.add_leaf(
        plane,
        "serve",
        serve_control_plane,
        "serve the gRPC API until SIGINT/SIGTERM (settings from GPUPLANE_* env)",
        env_file,
    )
    serve.add_argument("--listen", help="gRPC host:port (GPUPLANE_LISTEN_ADDR)")
    serve.add_argument("--metrics", help="/metrics host:port, empty = off (GPUPLANE_METRICS_ADDR)")
    serve.add_argument(
        "--dashboard", help="web dashboard host:port, empty = off (GPUPLANE_DASHBOARD_ADDRESS)"
    )
    serve.add_argument("--data-dir", type=Path, help="GPUPLANE_DATA_DIR")
    serve.add_argument("--database-url", help="GPUPLANE_DATABASE_URL; empty = SQLite in data dir")
    serve.add_argument("--log-level", help="GPUPLANE_LOG_LEVEL")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="json: one object per line (GPUPLANE_LOG_FORMAT)",
    )

    daemon = a.add_group(subparsers, "daemon", "the provider daemon on a GPU machine")
    module = daemon_cli() if want_daemon else None
    if module is not None:
        module.add_daemon_parser(daemon)
        module.add_install_parser(daemon)
    else:
        # Listed for --help; the daemon's own parser is loaded only when a daemon command runs.
        run = a.add_leaf(daemon, "run", daemon_missing, "run the provider daemon", env_file)
        run.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        install = a.add_leaf(
            daemon, "install", daemon_missing, "install the daemon as a systemd service", env_file
        )
        install.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def daemon_cli() -> ModuleType | None:
    """The daemon's own CLI module, imported only when a daemon command is run."""
    try:
        module = importlib.import_module(DAEMON_CLI)
    except ModuleNotFoundError as exc:
        if exc.name not in (DAEMON_CLI, "daemon"):
            raise
        return None
    return module if hasattr(module, "add_daemon_parser") else None


async def serve_control_plane(args: argparse.Namespace, ctx: Context) -> int:
    from pydantic import ValidationError

    from controlplane.server import serve
    from controlplane.settings import Settings
    from controlplane.tls import TlsConfigError

    overrides: dict[str, Any] = {}
    for flag, field in (
        ("listen", "listen_addr"),
        ("metrics", "metrics_addr"),
        ("dashboard", "dashboard_address"),
        ("data_dir", "data_dir"),
        ("database_url", "database_url"),
        ("log_level", "log_level"),
        ("log_format", "log_format"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides[field] = value
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise CliError(f"invalid settings: {problems}", EXIT_USAGE) from None
    configure_logging(settings.log_level, log_format=settings.log_format)
    try:
        await serve(settings)
    except TlsConfigError as exc:
        raise CliError(f"invalid TLS settings: {exc}", EXIT_USAGE) from None
    return EXIT_OK


def configure_logging(
    level: str, log_file: Path | None = None, log_format: LogFormat = "text"
) -> None:
    """Logs to stderr (or to `log_file`, with only warnings on stderr), as text or JSON."""
    from messaging.jsonlog import formatter

    root = logging.getLogger()
    root.setLevel(level.upper())
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter(log_format))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
        to_file.setFormatter(formatter(log_format))
        root.addHandler(to_file)
        console.setLevel(logging.WARNING)
    root.addHandler(console)


async def daemon_missing(args: argparse.Namespace, ctx: Context) -> int:
    raise CliError(
        "the provider daemon is not part of this build yet (no module daemon.cli)",
        EXIT_UNIMPLEMENTED,
    )
