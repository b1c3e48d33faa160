"""Prometheus metrics of one control-plane process and the HTTP endpoint that serves them."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    """One registry per control plane, so several can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "gpuplane_rpc_total",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "gpuplane_rpc_duration_seconds",
            "RPC handling time, by method.",
            ["method"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.up = Gauge("gpuplane_up", "1 while this control plane serves.", registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, addr: str) -> int:
        """Starts /metrics on `addr` ("host:port", port 0 picks one); returns the port."""
        host, _, port = addr.rpartition(":")
        server, thread = start_http_server(
            int(port), addr=host or "127.0.0.1", registry=self.registry
        )
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
