"""`gpuplane daemon install` and deploy/install-daemon.sh without touching the system: every
path under tmp, the driver, toolkit, systemctl and the venv's Python replaced by recording
stand-ins on PATH, the fake libnvidia-ml.so.1 on LD_LIBRARY_PATH, the harness Docker engine."""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import install, preflight
from daemon.cli import add_install_parser
from devstack import DockerEngine

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).parent.parent.parent
# Records its arguments; `python -m venv DIR` makes DIR/bin/python (a copy of this script),
# `-m pip` is recorded, anything else runs on the real interpreter (the checks' probes).
FAKE_PYTHON = """#!/bin/sh
PATH=/usr/bin:/bin
echo "$(basename "$0") $*" >> "{log}"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi
exec "{python}" "$@"
"""
RECORDER = '#!/bin/sh\nPATH=/usr/bin:/bin\necho "$(basename "$0") $*" >> "{log}"\n'
# systemctl: records its arguments and keeps whether the service runs in the file {active}
# (systemd itself cannot run in a test container): is-active answers from it.
SYSTEMCTL = (
    RECORDER
    + """\
case "$1 $2" in
    "is-active --quiet") [ -e "{active}" ]; exit $? ;;
    "enable --now" | "start "* | "restart "*) touch "{active}" ;;
    "stop "*) rm -f "{active}" ;;
esac
exit 0
"""
)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class Host:
    """A pretend GPU host under tmp: bin/ with stand-ins, the install targets, a call log."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.log = tmp / "calls.log"
        self.log.touch()
        self.python = executable(
            self.bin / "python-for-venv", FAKE_PYTHON.format(log=self.log, python=sys.executable)
        )
        self.env = {"PATH": str(self.bin), "LD_LIBRARY_PATH": "/nonexistent"}
        booted = tmp / "run-systemd-system"
        booted.mkdir()
        monkeypatch.setattr(preflight, "SYSTEMD_RUNTIME_DIR", booted)
        self.active = tmp / "service-active"
        executable(self.bin / "systemctl", SYSTEMCTL.format(log=self.log, active=self.active))

    def add_gpu_stack(self, nvml: Path) -> None:
        for name in ("nvidia-smi", "nvidia-ctk", "nvidia-container-runtime-hook"):
            executable(self.bin / name, RECORDER.format(log=self.log))
        self.env["LD_LIBRARY_PATH"] = str(nvml)

    def argv(self, *extra: str) -> list[str]:
        return [
            "--prefix",
            str(self.tmp / "opt"),
            "--config",
            str(self.tmp / "etc" / "daemon.env"),
            "--unit-dir",
            str(self.tmp / "units"),
            "--data-dir",
            str(self.tmp / "data"),
            "--python",
            str(self.python),
            "--source",
            "gpuplane==0.1.0",
            *extra,
        ]

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()


def run(host: Host, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    add_install_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["install", *host.argv(*argv)])
    out = io.StringIO()
    code = install.install(args, out, host.env)
    return code, out.getvalue()


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    return Host(tmp_path, monkeypatch)


def test_the_unit_in_deploy_is_what_the_installer_writes() -> None:
    defaults = install.Paths(
        Path("/opt/gpuplane"),
        Path("/etc/gpuplane/daemon.env"),
        Path("/etc/systemd/system"),
        Path("/var/lib/gpuplane/daemon"),
    )
    unit = (ROOT / "deploy" / "gpuplane-daemon.service").read_text()
    assert unit == install.render_unit(defaults)
    for line in (
        "Restart=always",
        "EnvironmentFile=/etc/gpuplane/daemon.env",
        "NoNewPrivileges=yes",
    ):
        assert line in unit.splitlines()
    assert "docker.service" in next(x for x in unit.splitlines() if x.startswith("After="))


@pytest.mark.docker
def test_dry_run_prints_every_action_and_changes_nothing(
    host: Host, fake_nvml: Path, docker_engine: DockerEngine
) -> None:
    host.add_gpu_stack(fake_nvml)
    host.env["DOCKER_HOST"] = docker_engine.base_url
    code, out = run(
        host, "--dry-run", "--control-plane", "cp.example:50051", "--token", "grt_sekrit",
        "--label", "rack=r1", "--price-per-gpu-hour", "2.5",
    )  # fmt: skip
    assert code == 0, out
    assert "FAIL" not in out
    assert "[ok  ] NVML (libnvidia-ml.so.1): loadable" in out
    assert "[ok  ] Docker engine:" in out
    actions = [line.strip() for line in out.splitlines() if line[:5].strip().rstrip(".").isdigit()]
    assert [a.split(" ", 2)[1] for a in actions] == [
        "note", "create", "run:", "run:", "create", "write", "write", "run:", "run:", "systemctl",
    ]  # fmt: skip
    assert f"-m venv {host.tmp / 'opt' / 'venv'}" in out
    assert "-m pip install --upgrade gpuplane==0.1.0" in out
    assert "GPUPLANE_DAEMON_CONTROL_PLANE=cp.example:50051" in out
    assert "GPUPLANE_DAEMON_PRICE_PER_GPU_HOUR_MICRO_CREDITS=2500000" in out
    assert "grt_sekrit" not in out
    assert "systemctl enable --now gpuplane-daemon.service" in out
    assert f"ExecStart={host.tmp / 'opt'}/venv/bin/gpuplane daemon run" in out
    assert sorted(p.name for p in host.tmp.iterdir()) == ["bin", "calls.log", "run-systemd-system"]
    # Only the checks' probes ran (through the stand-in); no venv, pip or systemctl.
    assert all(c.startswith("python-for-venv -c") for c in host.calls()), host.calls()


def test_checks_say_what_is_missing_and_how_to_fix_it(host: Host) -> None:
    host.env["DOCKER_HOST"] = f"unix://{host.tmp / 'no-docker.sock'}"
    code, out = run(host, "--dry-run")
    assert code == 1
    for expected in (
        "[FAIL] NVIDIA driver (nvidia-smi): nvidia-smi is not on PATH",
        "[FAIL] NVML (libnvidia-ml.so.1): cannot be loaded",
        "[FAIL] NVIDIA container toolkit: none of nvidia-container-runtime-hook, nvidia-ctk",
        "nvidia-ctk runtime configure --runtime=docker",
        "[FAIL] Docker engine:",
        "[FAIL] settings: no control plane address: pass --control-plane",
        "[FAIL] settings: this host is not registered yet: pass --token",
        "dry run: nothing was changed.",
    ):
        assert expected in out, out
    # Without --dry-run nothing is done at all.
    code, out = run(host, "--control-plane", "cp:1", "--token", "t")
    assert code == 1
    assert "not installing: 4 problem(s) above." in out
    assert not (host.tmp / "opt").exists()


@pytest.mark.docker
def test_simulated_hosts_need_no_driver(host: Host, docker_engine: DockerEngine) -> None:
    host.env["DOCKER_HOST"] = docker_engine.base_url
    code, out = run(host, "--dry-run", "--simulate-gpus", "1xL4", "--control-plane", "c:1",
                    "--token", "t")  # fmt: skip
    assert code == 0, out
    assert "[warn] NVIDIA driver (nvidia-smi)" in out


@pytest.mark.docker
def test_install_into_a_tmp_prefix_then_upgrade_keeps_the_token(
    host: Host, fake_nvml: Path, docker_engine: DockerEngine
) -> None:
    host.add_gpu_stack(fake_nvml)
    host.env["DOCKER_HOST"] = docker_engine.base_url
    code, out = run(host, "--control-plane", "cp:50051", "--token", "grt_x y", "--no-start")
    assert code == 0, out
    config = host.tmp / "etc" / "daemon.env"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert install.read_env_file(config) == {
        "GPUPLANE_DAEMON_CONTROL_PLANE": "cp:50051",
        "GPUPLANE_DAEMON_REGISTRATION_TOKEN": "grt_x y",
        "GPUPLANE_DAEMON_DATA_DIR": str(host.tmp / "data"),
    }
    unit = (host.tmp / "units" / "gpuplane-daemon.service").read_text()
    assert f"EnvironmentFile={config}" in unit
    assert stat.S_IMODE((host.tmp / "data").stat().st_mode) == 0o700
    venv = host.tmp / "opt" / "venv"
    assert [c for c in host.calls() if " -c " not in c] == [
        f"python-for-venv -m venv {venv}",
        "python -m pip install --upgrade gpuplane==0.1.0",
        "systemctl daemon-reload",
        "systemctl enable gpuplane-daemon.service",
    ]
    # Again, with a new setting: the venv is reused and the token stays in the config.
    host.log.write_text("")
    code, out = run(host, "--location", "eu-west")
    assert code == 0, out
    values = install.read_env_file(config)
    assert values["GPUPLANE_DAEMON_REGISTRATION_TOKEN"] == "grt_x y"
    assert values["GPUPLANE_DAEMON_LOCATION"] == "eu-west"
    calls = [c for c in host.calls() if " -c " not in c]
    assert calls[0] == "systemctl is-active --quiet gpuplane-daemon.service"
    assert calls[1] == "python -m pip install --upgrade gpuplane==0.1.0"
    assert calls[-1] == "systemctl enable --now gpuplane-daemon.service"  # it was not running


def test_the_shell_script_runs_the_installer_from_the_checkout(host: Host) -> None:
    env = {**host.env, "PATH": f"{host.bin}:/usr/bin:/bin", "PYTHON": sys.executable}
    env["DOCKER_HOST"] = f"unix://{host.tmp / 'none.sock'}"
    done = subprocess.run(
        ["bash", str(ROOT / "deploy" / "install-daemon.sh"), *host.argv("--dry-run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert done.returncode == 1, done.stderr  # docker and the driver are missing here
    assert "dry run: would do, in order:" in done.stdout
    assert "dry run: nothing was changed." in done.stdout
    assert not (host.tmp / "opt").exists()
    assert os.access(ROOT / "deploy" / "install-daemon.sh", os.X_OK)
