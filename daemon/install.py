"""`gpuplane daemon install`: checks, virtualenv, config (0600), systemd unit, enabled service.

Standard library only, so that `deploy/install-daemon.sh` can run it (`python3 -m
daemon.install`) before the virtualenv exists. `--dry-run` prints every action, changes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TextIO

from daemon import preflight

SERVICE = "gpuplane-daemon"
DOCKER_CONFIG = Path("/etc/docker/daemon.json")
ENV_PREFIX = "GPUPLANE_DAEMON_"
SECRET_KEYS = {"REGISTRATION_TOKEN"}
# The checkout this module lives in, when it is one (installed from source by default).
SOURCE_TREE = Path(__file__).resolve().parent.parent
UNIT_TEMPLATE = """\
# gpuplane provider daemon. Installed by `gpuplane daemon install` (deploy/install-daemon.sh).
# Stopping the daemon leaves job containers running; the next start re-attaches to them.
# The data dir must exist (ReadWritePaths); the installer creates it. See deploy/README.md.
[Unit]
Description=gpuplane provider daemon
After=network-online.target docker.service
Wants=network-online.target docker.service

[Service]
Type=simple
EnvironmentFile={config}
ExecStart={prefix}/venv/bin/gpuplane daemon run
Restart=always
RestartSec=5
TimeoutStopSec=30
LimitNOFILE=65536
# Hardening. Not PrivateDevices (NVML needs /dev/nvidia*), not ProtectProc (GPU processes
# are attributed to jobs through /proc/<pid>/cgroup), no syscall filter (driver ioctls).
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir}
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
"""


@dataclass
class Action:
    """One step of the install: what it does, in words, and the doing."""

    describe: str
    run: Callable[[], None]


@dataclass
class Paths:
    prefix: Path
    config: Path
    unit_dir: Path
    data_dir: Path

    @property
    def venv(self) -> Path:
        return self.prefix / "venv"

    @property
    def unit(self) -> Path:
        return self.unit_dir / f"{SERVICE}.service"


def render_unit(paths: Paths) -> str:
    return UNIT_TEMPLATE.format(prefix=paths.prefix, config=paths.config, data_dir=paths.data_dir)


def quote(value: str) -> str:
    """A value as systemd's EnvironmentFile reads it: bare when plain, else double-quoted."""
    if value and all(c.isalnum() or c in "-_.:/,@+=" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        return inner.replace('\\"', '"').replace("\\\\", "\\") if value[0] == '"' else inner
    return value


def read_env_file(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    values = {}
    for line in lines:
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key.strip()] = unquote(value)
    return values


def render_env(values: Mapping[str, str], mask: bool = False) -> str:
    lines = [
        "# gpuplane provider daemon settings (GPUPLANE_DAEMON_*), read by gpuplane-daemon.service.",
        "# Written by `gpuplane daemon install`; deploy/daemon.env.example lists every setting.",
    ]
    for key in sorted(values):
        value = values[key]
        if mask and key.removeprefix(ENV_PREFIX) in SECRET_KEYS:
            value = f"<secret, {len(value)} characters>"
        lines.append(f"{key}={quote(value)}")
    return "\n".join(lines) + "\n"


def settings_from_args(args: argparse.Namespace) -> dict[str, str]:
    """GPUPLANE_DAEMON_* values given on the command line (flags, then --set)."""
    values: dict[str, str] = {}
    for flag in (
        "control_plane",
        "token",
        "simulate_gpus",
        "location",
        "nats_url",
        "docker_host",
    ):
        value = getattr(args, flag, None)
        if value is not None:
            name = "REGISTRATION_TOKEN" if flag == "token" else flag.upper()
            values[ENV_PREFIX + name] = value
    if args.price_per_gpu_hour is not None:
        values[ENV_PREFIX + "PRICE_PER_GPU_HOUR_MICRO_CREDITS"] = str(args.price_per_gpu_hour)
    if args.label:
        values[ENV_PREFIX + "LABELS"] = json.dumps(dict(args.label), sort_keys=True)
    for key, value in args.set or []:
        values[ENV_PREFIX + key.upper().removeprefix(ENV_PREFIX)] = value
    return values


def _micro_credits(text: str) -> int:
    try:
        micro = Decimal(text.strip()) * 1_000_000
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decimal number of credits") from None
    if not micro.is_finite() or micro <= 0 or micro != micro.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text!r}: more than 0, at most 6 decimal places")
    return int(micro)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--dry-run", action="store_true", help="print every action; change nothing")
    add("--prefix", type=Path, default=Path("/opt/gpuplane"), help="virtualenv goes in PREFIX/venv")
    add("--config", type=Path, default=Path("/etc/gpuplane/daemon.env"), help="env file (0600)")
    add("--unit-dir", type=Path, default=Path("/etc/systemd/system"), help="systemd unit dir")
    add("--data-dir", type=Path, default=Path("/var/lib/gpuplane/daemon"), help="daemon state")
    add("--python", default=preflight.default_python(), help="interpreter for the virtualenv")
    add("--source", help="what pip installs (default: this checkout, else gpuplane==VERSION)")
    add("--pip-arg", action="append", default=[], help="extra pip argument (repeatable)")
    add(
        "--no-start",
        action="store_true",
        help="enable the service but do not start it (nor restart it when it runs)",
    )
    add("--skip-checks", action="store_true", help="install even when a required check fails")
    add(
        "--userns-remap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn on Docker's userns-remap if the (local) engine lacks it (default: yes)",
    )
    add("--docker-config", type=Path, default=DOCKER_CONFIG, help="the engine's daemon.json")
    settings = parser.add_argument_group("daemon settings (written to the env file)")
    add = settings.add_argument
    add("--control-plane", metavar="HOST:PORT", help="control plane gRPC address")
    add("--token", help="host registration token (until the host has registered)")
    add("--simulate-gpus", metavar="SPEC", help="no NVIDIA GPUs: simulate e.g. 2xA100-80GB")
    add("--price-per-gpu-hour", type=_micro_credits, metavar="CREDITS", help="e.g. 2.5")
    add("--location", help="where the host is, e.g. eu-west")
    add("--label", type=_key_value, action="append", metavar="KEY=VALUE", help="repeatable")
    add("--docker-host", metavar="URL", help="Docker engine (default: DOCKER_HOST or the socket)")
    add("--nats-url", help="NATS server(s), comma-separated (default: from registration)")
    add("--set", type=_key_value, action="append", metavar="KEY=VALUE", help="any daemon setting")


def _command(argv: list[str], env: Mapping[str, str]) -> Action:
    return Action(f"run: {' '.join(argv)}", lambda: _run(argv, env))


def _run(argv: list[str], env: Mapping[str, str]) -> None:
    subprocess.run(argv, check=True, env=dict(env))


def _mkdir(path: Path, mode: int) -> Action:
    return Action(
        f"create directory {path} (mode {mode:o})",
        lambda: path.mkdir(parents=True, exist_ok=True, mode=mode),
    )


def _write(path: Path, text: str, mode: int, shown: str) -> Action:
    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        temporary = path.with_name(f".{path.name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)

    body = "".join(f"\n       | {line}" for line in shown.splitlines())
    return Action(f"write {path} (mode {mode:o}):{body}", write)


def installed_fingerprint(paths: Paths) -> str:
    """A digest of what the service runs: its unit, its env file, and the RECORD of the
    installed gpuplane (every file of the package with its hash: a new release changes it)."""
    digest = hashlib.sha256()
    records = sorted(paths.venv.glob("lib/python*/site-packages/gpuplane-*.dist-info/RECORD"))
    for path in (paths.unit, paths.config, *records):
        digest.update(f"{path}\0".encode())
        try:
            digest.update(path.read_bytes())
        except FileNotFoundError:
            digest.update(b"\0missing")
    return digest.hexdigest()


@dataclass
class Upgrade:
    """A running service is restarted when this install changed what it runs: `enable --now`
    leaves a running service alone, so an upgrade would otherwise keep the old code."""

    paths: Paths
    env: Mapping[str, str]
    was_running: bool = False
    before: str = ""

    def note(self) -> Action:
        def note() -> None:
            argv = ["systemctl", "is-active", "--quiet", f"{SERVICE}.service"]
            self.was_running = subprocess.run(argv, env=dict(self.env)).returncode == 0
            self.before = installed_fingerprint(self.paths)

        return Action(f"note whether {SERVICE}.service runs, and what it runs", note)

    def restart(self) -> Action:
        def restart() -> None:
            if self.was_running and installed_fingerprint(self.paths) != self.before:
                _run(["systemctl", "restart", f"{SERVICE}.service"], self.env)

        describe = f"systemctl restart {SERVICE}.service if it was running and what it runs changed"
        return Action(describe, restart)


def _remap_users(path: Path) -> Action:
    """Adds userns-remap to the engine's daemon.json, keeping what else it says."""

    def write() -> None:
        config = json.loads(path.read_text() or "{}") if path.exists() else {}
        config["userns-remap"] = "default"
        _write(path, json.dumps(config, indent=2, sort_keys=True) + "\n", 0o644, "").run()

    return Action(f'set "userns-remap": "default" in {path} (other settings kept)', write)


def plan(
    args: argparse.Namespace,
    paths: Paths,
    values: dict[str, str],
    env: Mapping[str, str],
    *,
    remap_users: bool = False,
) -> list[Action]:
    """Every step, in order; nothing is done here. Commands run with `env` (its PATH).
    `remap_users`: turn on the local engine's userns-remap (and restart it) first."""
    upgrade = Upgrade(paths, env)
    actions = [] if args.no_start else [upgrade.note()]
    if remap_users:
        actions.append(_remap_users(args.docker_config))
        actions.append(_command(["systemctl", "restart", "docker"], env))
    source = args.source or (
        str(SOURCE_TREE) if (SOURCE_TREE / "pyproject.toml").exists() else "gpuplane"
    )
    python = str(paths.venv / "bin" / "python")
    actions.append(_mkdir(paths.prefix, 0o755))
    if not (paths.venv / "bin" / "python").exists():
        actions.append(_command([args.python, "-m", "venv", str(paths.venv)], env))
    pip = [python, "-m", "pip", "install", "--upgrade", *args.pip_arg, source]
    actions.append(_command(pip, env))
    actions.append(_mkdir(paths.data_dir, 0o700))
    config_text = render_env(values)
    actions.append(_write(paths.config, config_text, 0o600, render_env(values, mask=True)))
    unit = render_unit(paths)
    actions.append(_write(paths.unit, unit, 0o644, unit))
    actions.append(_command(["systemctl", "daemon-reload"], env))
    enable = ["systemctl", "enable", f"{SERVICE}.service"]
    if args.no_start:
        actions.append(_command(enable, env))
        return actions
    actions.append(_command([*enable[:2], "--now", *enable[2:]], env))
    actions.append(upgrade.restart())
    return actions


def checks(
    args: argparse.Namespace, paths: Paths, values: Mapping[str, str], env: Mapping[str, str]
) -> list[preflight.Check]:
    """Every requirement; GPU ones are optional when the daemon simulates its GPUs."""
    needs_gpus = not values.get(ENV_PREFIX + "SIMULATE_GPUS")
    docker_host = values.get(ENV_PREFIX + "DOCKER_HOST") or preflight.default_docker_host(env)
    results = preflight.check_driver(env, args.python, required=needs_gpus)
    results.append(preflight.check_toolkit(env, required=needs_gpus))
    results.extend(preflight.check_docker(docker_host, needs_gpus, preflight.hook_on_path(env)))
    results.append(preflight.check_python(args.python))
    results.append(preflight.check_systemd(env))
    targets = [paths.prefix, paths.config, paths.unit_dir, paths.data_dir]
    results.append(preflight.check_writable(targets))
    return results


def missing_settings(values: Mapping[str, str], paths: Paths) -> list[str]:
    problems = []
    if not values.get(ENV_PREFIX + "CONTROL_PLANE"):
        problems.append("no control plane address: pass --control-plane HOST:PORT")
    registered = (paths.data_dir / "host.json").exists()
    if not registered and not values.get(ENV_PREFIX + "REGISTRATION_TOKEN"):
        problems.append("this host is not registered yet: pass --token (a registration token)")
    return problems


def install(
    args: argparse.Namespace, out: TextIO = sys.stdout, env: Mapping[str, str] = os.environ
) -> int:
    """Runs the checks, then (unless --dry-run) every action; returns the exit code."""
    paths = Paths(args.prefix, args.config, args.unit_dir, args.data_dir)
    values = {**read_env_file(paths.config), **settings_from_args(args)}
    values.setdefault(ENV_PREFIX + "DATA_DIR", str(paths.data_dir))
    results = checks(args, paths, values, env)
    print("checks:", file=out)
    for result in results:
        print(f"  {result.line()}", file=out)
    unset = missing_settings(values, paths)
    for problem in unset:
        print(f"  [FAIL] settings: {problem}", file=out)
    problems = [f"{c.name}: {c.detail}" for c in results if c.required and not c.ok] + unset
    if problems and not args.dry_run and not args.skip_checks:
        print(f"not installing: {len(problems)} problem(s) above.", file=out)
        return 1
    print("dry run: would do, in order:" if args.dry_run else "installing:", file=out)
    remap = args.userns_remap and any(c.name == preflight.USERNS and not c.ok for c in results)
    local = values.get(ENV_PREFIX + "DOCKER_HOST") or preflight.default_docker_host(env)
    remap = remap and local.startswith("unix://")  # another machine's engine is not ours
    for number, action in enumerate(plan(args, paths, values, env, remap_users=remap), 1):
        print(f"  {number}. {action.describe}", file=out, flush=True)
        if not args.dry_run:
            action.run()
    if args.dry_run:
        print("dry run: nothing was changed.", file=out)
        return 1 if problems else 0
    print(f"installed; `journalctl -u {SERVICE} -f` shows the daemon's log.", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuplane daemon install", description=__doc__)
    add_arguments(parser)
    try:
        return install(parser.parse_args(argv))
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
