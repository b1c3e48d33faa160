"""A Docker engine for tests and the local stack: a private dockerd as root, else the host's."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
from docker.errors import DockerException

from devstack.process import DevstackError, LocalServer, ManagedProcess, find_binary

NVIDIA_HOOK = "nvidia-container-runtime-hook"
_SYSTEM_BIN = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# dockerd registers its "nvidia" device driver only when this executable is on its PATH
# at start. With it, DeviceRequests (driver nvidia / capability gpu) are accepted: dockerd
# sets NVIDIA_VISIBLE_DEVICES and NVIDIA_DRIVER_CAPABILITIES in the container and adds the
# hook as an OCI prestart hook, which runc runs with args `prestart` and the container
# state JSON on stdin. This stand-in records that and exits 0, so the container starts
# (without GPUs). Shell builtins only: runc gives hooks an empty environment.
_HOOK_SCRIPT = """#!/bin/sh
# devstack stand-in for NVIDIA's prestart hook: record the call, let the container start.
{{
  printf 'ARGV %s\\n' "$*"
  state=''
  while IFS= read -r line || [ -n "$line" ]; do state="$state$line"; done
  printf 'STATE %s\\n' "$state"
}} >> {log} 2>&1
exit 0
"""


@dataclass
class HookCall:
    """One run of the stand-in hook: its arguments and the OCI state runc passed on stdin
    (`id` is the container id, `bundle` its bundle directory, `pid` its init process)."""

    argv: list[str]
    state: dict[str, Any] = field(default_factory=dict)


def _ping_unix(path: str, timeout: float = 2.0) -> bool:
    """GET /_ping over a unix socket; True on `200 OK`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]


class DockerEngine(LocalServer):
    """A Docker engine reachable at `base_url`.

    As root with `dockerd` installed (`private=None` or True): a private dockerd (and its
    containerd) with its own socket, data root and exec root, in its own network namespace
    (`unshare --net`). There it has the default bridge, user networks and iptables rules to
    itself, so it never touches the host's interfaces, firewall or sysctls and runs beside
    a system dockerd or other private ones. Containers get working container networking
    but no route to the host or the internet; network mode "host" means the engine's
    namespace. A stand-in NVIDIA hook is on its PATH; its calls land in `hook_log`. It
    remaps users (`--userns-remap=default`, as deploy/ sets up providers' engines: root in a
    container is the unprivileged `dockremap` range on the host) when `userns` is True, or
    None and the host can create that user (`useradd`, or an existing subuid entry).

    Otherwise (`private=False`, or not root): the engine at DOCKER_HOST (with the usual
    DOCKER_TLS_VERIFY / DOCKER_CERT_PATH) or the default socket, left running at stop();
    `hook_log` is None.
    """

    name = "dockerd"

    def __init__(
        self,
        directory: Path,
        *,
        private: bool | None = None,
        timeout: float = 60.0,
        userns: bool | None = None,
    ) -> None:
        super().__init__()
        self.userns = userns
        self.directory = Path(directory).absolute()
        self.private = private
        self.timeout = timeout
        self.base_url = ""
        self.hook_log: Path | None = None
        self.data_root = self.directory / "data-root"
        self._runtime: Path | None = None
        self._process: ManagedProcess | None = None

    @property
    def pid(self) -> int | None:
        """The private dockerd's process id (None for a host engine)."""
        return self._process.pid if self._process is not None else None

    def client(self, timeout: int = 120) -> docker.DockerClient:
        """A Docker SDK client for this engine (API version negotiated)."""
        if self.private:
            return docker.DockerClient(base_url=self.base_url, version="auto", timeout=timeout)
        return docker.from_env(version="auto", timeout=timeout)

    def _start(self) -> None:
        dockerd = find_binary("dockerd", _SYSTEM_BIN)
        can_own = os.geteuid() == 0 and dockerd is not None
        if self.private is None:
            self.private = can_own
        if not self.private:
            self._use_existing()
            return
        if dockerd is None or os.geteuid() != 0:
            raise DevstackError(
                "could not start dockerd: a private engine needs root and `dockerd` "
                "(Debian: apt-get install docker.io; scripts/bootstrap does)"
            )
        self._start_private(dockerd)

    def _use_existing(self) -> None:
        self.base_url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        try:
            client = self.client(timeout=10)
            client.ping()
            client.close()
        except DockerException as exc:
            raise DevstackError(
                f"could not start dockerd: not root, so no private engine, and the engine at "
                f"{self.base_url} does not answer ({exc}). Run the tests as root with "
                "docker.io installed, or set DOCKER_HOST to a running engine you may use "
                "(e.g. add yourself to the `docker` group)."
            ) from exc

    def _start_private(self, dockerd: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        # The API socket and containerd's sockets live here: unix socket paths are capped
        # at 108 bytes, and pytest's temp dirs can be long.
        self._runtime = Path(tempfile.mkdtemp(prefix="gpd-"))
        sock = self._runtime / "docker.sock"
        hooks = self.directory / "hooks"
        hooks.mkdir(exist_ok=True)
        self.hook_log = self.directory / "nvidia-hook.log"
        self.hook_log.touch()
        hook = hooks / NVIDIA_HOOK
        hook.write_text(_HOOK_SCRIPT.format(log=shlex.quote(str(self.hook_log))))
        hook.chmod(0o755)
        config = self.directory / "daemon.json"
        config.write_text("{}\n")  # not /etc/docker/daemon.json: flags there would clash
        path = os.environ.get("PATH", "")
        for extra in _SYSTEM_BIN:
            if extra not in path.split(os.pathsep):
                path = f"{path}{os.pathsep}{extra}" if path else extra
        env = {**os.environ, "PATH": f"{hooks}{os.pathsep}{path}"}
        env.pop("DOCKER_HOST", None)
        unshare = find_binary("unshare", _SYSTEM_BIN)
        if unshare is None:
            raise DevstackError("could not start dockerd: no `unshare` (util-linux) on PATH")
        if self.userns is None:
            self.userns = _can_remap_users()
        if self.userns:
            # The remapped root must traverse every directory above its data root (o+x);
            # pytest's temp dirs are 0700, so it lives beside the sockets instead.
            self._runtime.chmod(0o711)
            self.data_root = self._runtime / "data-root"
        argv = [
            unshare,
            "--net",  # then execs dockerd: same pid, own network namespace
            "--",
            dockerd,
            f"--host=unix://{sock}",
            f"--data-root={self.data_root}",
            f"--exec-root={self._runtime / 'exec'}",
            f"--pidfile={self._runtime / 'docker.pid'}",
            f"--config-file={config}",
            "--userland-proxy=false",
            "--shutdown-timeout=5",
        ]
        if self.userns:
            argv.append("--userns-remap=default")
        self.base_url = f"unix://{sock}"
        self._process = ManagedProcess(
            self.name,
            argv,
            log_path=self.directory / "dockerd.log",
            env=env,
            cwd=self.directory,
            stop_timeout=30.0,
            leftover_dirs=[self._runtime],
        )
        self._process.start()
        self._process.wait_ready(lambda: _ping_unix(str(sock)), self.timeout, "GET /_ping")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        if self._runtime is not None:
            # A dockerd that died hard leaves its shims and their containers running.
            kill_processes_mentioning(str(self._runtime))
            unmount_under(self._runtime)
            unmount_under(self.data_root)
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    def hook_calls(self) -> list[HookCall]:
        """The stand-in NVIDIA hook's calls so far, oldest first."""
        if self.hook_log is None or not self.hook_log.exists():
            return []
        calls: list[HookCall] = []
        for line in self.hook_log.read_text().splitlines():
            if line.startswith("ARGV "):
                calls.append(HookCall(argv=line[5:].split()))
            elif line.startswith("STATE ") and calls:
                with contextlib.suppress(ValueError):
                    calls[-1].state = json.loads(line[6:])
        return calls


def remove_containers(client: docker.DockerClient, label: str) -> None:
    """Removes every container carrying `label` ("key" or "key=value"), running or not, with
    what runs in it; one that went meanwhile is fine. Tests use it to leave no workload
    behind a daemon they stopped (a stopped daemon leaves its containers for its next start)."""
    for container in client.containers.list(all=True, filters={"label": label}):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def _can_remap_users() -> bool:
    """dockerd's `--userns-remap=default` creates the `dockremap` user (useradd) and its
    subordinate ids, or uses them when they exist."""
    try:
        if "dockremap:" in Path("/etc/subuid").read_text():
            return True
    except OSError:
        pass
    return find_binary("useradd", _SYSTEM_BIN) is not None


def unmount_under(root: Path) -> None:
    """Lazily unmounts what a killed dockerd left mounted at or below `root` (its data
    root bind mount, overlays, netns files)."""
    top = str(root.resolve())
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[1] for line in mounts if len(line.split()) > 1]
    inside = [p for p in points if p == top or p.startswith(top + "/")]
    for point in sorted(inside, reverse=True):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=10, check=False)


def kill_processes_mentioning(marker: str) -> None:
    """SIGKILLs every process whose command line contains `marker`, and its descendants."""
    parents: dict[int, int] = {}
    marked: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker.encode() in cmdline:
            marked.append(int(entry.name))
    doomed = set(marked)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        doomed |= children
        grew = bool(children)
    for pid in doomed - {os.getpid()}:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
