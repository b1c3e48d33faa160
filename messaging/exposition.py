"""What every gpuplane process's /metrics carries besides its own series, and the server."""

from __future__ import annotations

import platform
import socket
import threading
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

# A GPU's telemetry sample (GpuTelemetry) as metrics, for the daemon and the control plane
# alike: (name after the process's prefix, help, sample field, scale to the metric's unit).
GPU_GAUGES = (
    ("gpu_utilization_percent", "GPU utilisation.", "utilization_gpu_percent", 1.0),
    ("gpu_memory_used_bytes", "GPU memory in use.", "memory_used_bytes", 1.0),
    ("gpu_temperature_celsius", "GPU temperature.", "temperature_celsius", 1.0),
    ("gpu_power_watts", "GPU power draw.", "power_draw_milliwatts", 1e-3),
    ("gpu_sm_clock_hertz", "GPU SM clock.", "sm_clock_mhz", 1e6),
)
# NVML's ECC error counts only grow (until the driver reloads): counters (`_total`).
GPU_COUNTERS = (
    ("gpu_ecc_corrected_errors", "Corrected ECC errors NVML reports.", "ecc_corrected_errors"),
    (
        "gpu_ecc_uncorrected_errors",
        "Uncorrected ECC errors NVML reports.",
        "ecc_uncorrected_errors",
    ),
)


class GpuSampleFamilies:
    """One scrape's per-GPU telemetry families, named `prefix` + GPU_GAUGES/GPU_COUNTERS'
    names, with `labels`; `add` puts one sample in each, `families` yields them."""

    def __init__(self, prefix: str, labels: Sequence[str]) -> None:
        self.gauges = [
            (GaugeMetricFamily(prefix + name, text, labels=labels), field, scale)
            for name, text, field, scale in GPU_GAUGES
        ]
        self.counters = [
            (CounterMetricFamily(prefix + name, text, labels=labels), field)
            for name, text, field in GPU_COUNTERS
        ]

    def add(self, key: Sequence[str], sample: Any) -> None:
        for gauge, field, scale in self.gauges:
            gauge.add_metric(key, getattr(sample, field) * scale)
        for counter, field in self.counters:
            counter.add_metric(key, getattr(sample, field))

    def families(self) -> Iterator[Metric]:
        yield from (gauge for gauge, _, _ in self.gauges)
        yield from (counter for counter, _ in self.counters)


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


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for each scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base's name)
        pass


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
        host = host.strip("[]") or "127.0.0.1"

        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][0]

        server = make_server(
            host, int(port), make_wsgi_app(self.registry), Server, handler_class=_QuietHandler
        )
        # prometheus_client's start_http_server polls for shutdown every 0.5 s, which every
        # stop of a control plane or daemon waited out; 50 ms costs nothing measurable.
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
