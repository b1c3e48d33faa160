"""What a GPU host needs before the daemon can run there, each check saying how to fix it.

Standard library only: `deploy/install-daemon.sh` runs this before any virtualenv exists.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DRIVER_DOCS = "https://docs.nvidia.com/datacenter/tesla/driver-installation-guide/"
TOOLKIT_DOCS = (
    "https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html"
)
DOCKER_DOCS = "https://docs.docker.com/engine/install/"
TOOLKIT_BINARIES = ("nvidia-container-runtime-hook", "nvidia-ctk")
# Exists when systemd is the init system (sd_booted(3)).
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")
MIN_PYTHON = (3, 11)
_LOAD_NVML = "import ctypes; ctypes.CDLL('libnvidia-ml.so.1')"


@dataclass(frozen=True)
class Check:
    """One requirement: met or not, what was seen, and what to do when it is not met."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    # A failed optional check is a warning: the install goes on.
    required: bool = True

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        text = f"[{mark}] {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f"\n       fix: {self.fix}"
        return text


def _which(name: str, env: Mapping[str, str]) -> str | None:
    return shutil.which(name, path=env.get("PATH", os.defpath))


def hook_on_path(env: Mapping[str, str]) -> bool:
    """nvidia-container-runtime-hook is what dockerd needs for GPU device requests."""
    return _which(TOOLKIT_BINARIES[0], env) is not None


def check_driver(env: Mapping[str, str], python: str, required: bool = True) -> list[Check]:
    """nvidia-smi on PATH, and libnvidia-ml.so.1 loadable (tried in a child process, whose
    loader sees `env`'s LD_LIBRARY_PATH)."""
    smi = _which("nvidia-smi", env)
    checks = [
        Check(
            "NVIDIA driver (nvidia-smi)",
            smi is not None,
            smi or "nvidia-smi is not on PATH",
            f"install the NVIDIA datacenter driver for your GPUs ({DRIVER_DOCS}); on Ubuntu: "
            "`sudo ubuntu-drivers install --gpgpu`, then reboot",
            required,
        )
    ]
    try:
        loaded = subprocess.run(
            [python, "-c", _LOAD_NVML], env=dict(env), capture_output=True, timeout=30
        )
        ok, detail = loaded.returncode == 0, "loadable"
        if not ok:
            last = loaded.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            detail = f"cannot be loaded: {last[0]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, f"could not try loading it: {exc}"
    checks.append(
        Check(
            "NVML (libnvidia-ml.so.1)",
            ok,
            detail,
            "libnvidia-ml.so.1 ships with the NVIDIA driver: install the driver (see above) "
            "and make sure its libraries are in the loader path (`ldconfig -p | grep nvidia-ml`)",
            required,
        )
    )
    return checks


def check_toolkit(env: Mapping[str, str], required: bool = True) -> Check:
    found = [path for name in TOOLKIT_BINARIES if (path := _which(name, env))]
    return Check(
        "NVIDIA container toolkit",
        bool(found),
        ", ".join(found) if found else f"none of {', '.join(TOOLKIT_BINARIES)} is on PATH",
        f"install nvidia-container-toolkit ({TOOLKIT_DOCS}), then run "
        "`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`",
        required,
    )


def docker_info(docker_host: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET /info from the engine at `docker_host` (unix:// or tcp://); raises OSError."""
    url = urlparse(docker_host)
    connection: http.client.HTTPConnection
    if url.scheme == "unix":
        connection = _UnixConnection(url.path, timeout)
    elif url.scheme in ("tcp", "http"):
        connection = http.client.HTTPConnection(
            url.hostname or "", url.port or 2375, timeout=timeout
        )
    else:
        raise OSError(f"unsupported Docker host {docker_host!r} (unix:// or tcp:// only)")
    try:
        connection.request("GET", "/info", headers={"Host": "docker"})
        response = connection.getresponse()
        body = response.read()
    except (http.client.HTTPException, ValueError) as exc:
        raise OSError(f"bad reply from the Docker engine: {exc}") from exc
    finally:
        connection.close()
    if response.status != 200:
        raise OSError(f"the Docker engine answered {response.status} {response.reason}")
    info: dict[str, Any] = json.loads(body)
    return info


def check_docker(docker_host: str, needs_gpus: bool, hook_found: bool) -> list[Check]:
    """The engine answers; its runtimes say whether GPUs can reach containers."""
    try:
        info = docker_info(docker_host)
    except OSError as exc:
        return [
            Check(
                "Docker engine",
                False,
                f"{docker_host}: {exc}",
                f"install Docker Engine ({DOCKER_DOCS}) and start it "
                "(`sudo systemctl enable --now docker`), or pass --docker-host",
            )
        ]
    runtimes = sorted(info.get("Runtimes") or {})
    engine = Check(
        "Docker engine",
        True,
        f"{info.get('ServerVersion', '?')} at {docker_host}; runtimes: {', '.join(runtimes)}",
    )
    registered = "nvidia" in runtimes
    userns = check_userns(info)
    gpu = Check(
        "Docker GPU support",
        registered or hook_found,
        "nvidia runtime registered"
        if registered
        else "GPU device requests go through nvidia-container-runtime-hook"
        if hook_found
        else "no nvidia runtime and no NVIDIA hook: containers cannot get GPUs",
        "`sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`",
        needs_gpus,
    )
    return [engine, gpu, userns]


USERNS = "Docker user namespaces"


def userns_remapped(info: Mapping[str, Any]) -> bool:
    """Whether `docker info` says the engine remaps users (its security options name userns)."""
    options = [str(o) for o in info.get("SecurityOptions") or []]
    return any(o == "userns" or o.startswith("name=userns") for o in options)


def check_userns(info: Mapping[str, Any]) -> Check:
    """userns-remap on the engine: root in a job's container is not root on the host."""
    remapped = userns_remapped(info)
    return Check(
        USERNS,
        remapped,
        "userns-remap is on: root in a job is an unprivileged user on this host"
        if remapped
        else "userns-remap is off: jobs whose image runs as root will run as "
        "GPUPLANE_DAEMON_JOB_USER (65534), which some images do not expect",
        'the installer adds "userns-remap": "default" to /etc/docker/daemon.json and restarts '
        "Docker (--no-userns-remap leaves it); images and containers made before are not "
        "visible to the remapped engine",
        required=False,
    )


def check_python(python: str) -> Check:
    """The interpreter the virtualenv is made from: new enough, with venv and ensurepip."""
    probe = "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return Check("Python", False, f"{python}: {exc}", "install Python 3.11 or newer")
    want = ".".join(map(str, MIN_PYTHON))
    if done.returncode != 0:
        return Check(
            "Python",
            False,
            f"{python} has no venv/ensurepip module",
            "install the venv package (Debian/Ubuntu: `sudo apt install python3-venv`)",
        )
    version = done.stdout.strip()
    ok = tuple(int(p) for p in version.split(".")) >= MIN_PYTHON
    return Check(
        "Python", ok, f"{python} is {version}", f"install Python {want}+ and pass --python PATH"
    )


def check_systemd(env: Mapping[str, str]) -> Check:
    systemctl = _which("systemctl", env)
    booted = SYSTEMD_RUNTIME_DIR.is_dir()
    return Check(
        "systemd",
        systemctl is not None and booted,
        f"{systemctl or 'systemctl not on PATH'}; "
        f"{'systemd is' if booted else 'systemd is not'} the init system",
        "the daemon installs as a systemd service; elsewhere run `gpuplane daemon run` "
        "under your own supervisor (the unit in deploy/ shows the settings)",
    )


def check_writable(paths: list[Path]) -> Check:
    """Each path, or its nearest existing parent, is writable by this user."""
    blocked = []
    for path in paths:
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            blocked.append(str(path))
    return Check(
        "Permissions",
        not blocked,
        "can write every target" if not blocked else f"cannot write {', '.join(blocked)}",
        "run as root (sudo), or choose other --prefix/--config/--unit-dir/--data-dir",
    )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def default_docker_host(env: Mapping[str, str]) -> str:
    return env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def default_python() -> str:
    return sys.executable if sys.version_info >= MIN_PYTHON else "python3"
