"""What every gpuplane process's /metrics carries besides its own series, and the server."""

from __future__ import annotations

import platform
import threading
from importlib import metadata
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)


def package_version() -> str:
    try:
        return metadata.version("gpuplane")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def add_standard_collectors(registry: CollectorRegistry, build_info: str) -> None:
    """The client library's process_*, python_info and python_gc_* collectors (each process
    keeps its own registry, so they are added to it, not to the global one), and
    `<build_info>_info{version, python}` = 1."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    Info(build_info, "The gpuplane release this process runs.", registry=registry).info(
        {"version": package_version(), "python": platform.python_version()}
    )


class MetricsServer:
    """/metrics of one registry on a background thread."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, addr: str) -> int:
        """Starts /metrics on `addr` ("host:port", port 0 picks one; no host = 127.0.0.1);
        returns the port."""
        host, _, port = addr.rpartition(":")
        server, thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
