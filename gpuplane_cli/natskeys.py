"""`gpuplane nats init`: the operator and account seeds, and the nats-server config include."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, EXIT_USAGE, Context

CONFIG_NAME = "nats-auth.conf"
ENV_NAME = "controlplane-nats.env"


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    nats = a.add_group(subparsers, "nats", "NATS credentials (operator mode)")
    init = a.add_leaf(
        nats,
        "init",
        init_keys,
        "generate the operator and account seeds and the nats-server config include",
        common,
    )
    init.add_argument("--dir", type=Path, required=True, help="where to write both files")
    init.add_argument(
        "--resolver-dir",
        default="",
        help="where nats-server keeps account JWTs (default: DIR/jwt); as the server sees it",
    )
    init.add_argument("--force", action="store_true", help="replace existing files")


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    path.chmod(0o600)


def init_keys(args: argparse.Namespace, ctx: Context) -> int:
    directory: Path = args.dir
    config, env = directory / CONFIG_NAME, directory / ENV_NAME
    existing = [str(p) for p in (config, env) if p.exists()]
    if existing and not args.force:
        print(
            f"gpuplane: {', '.join(existing)} exist; new seeds would lock every registered "
            "host out of NATS (pass --force to replace them)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from messaging.natsjwt import NatsKeys  # here: it loads nats-py, which other commands skip

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = NatsKeys.generate()
    resolver_dir = args.resolver_dir or str((directory / "jwt").absolute())
    # The include holds only public JWTs; the seeds go to the control plane alone.
    config.write_text(keys.server_include(resolver_dir))
    _write_secret(
        env,
        "# NATS auth seeds of the gpuplane control plane (secrets: keep mode 0600).\n"
        f"GPUPLANE_NATS_OPERATOR_SEED={keys.operator_seed}\n"
        f"GPUPLANE_NATS_ACCOUNT_SEED={keys.account_seed}\n"
        f"GPUPLANE_NATS_SYSTEM_ACCOUNT_SEED={keys.system_account_seed}\n",
    )
    print(f"wrote {config} (include it in every nats-server's config)")
    print(f"wrote {env} (mode 0600: give it to every control plane, e.g. --env-file)")
    print(f"account {keys.account}, system account {keys.system_account}")
    return EXIT_OK
