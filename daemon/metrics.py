"""The daemon's Prometheus /metrics: its GPUs, attempts and containers, its links, its latencies."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from docker.errors import DockerException
from gpuplane.v1 import messaging_pb2
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.progress import Progress
from messaging.exposition import GpuSampleFamilies, MetricsServer, add_standard_collectors

if TYPE_CHECKING:
    from daemon.agent import Agent

log = logging.getLogger(__name__)

# `job_id`, not `job`: Prometheus gives `job` to the scrape job (and would rename ours).
GPU_LABELS = ["host", "gpu", "model", "job_id"]
_Kind = messaging_pb2.JobReportKind


class MetricsAddrError(Exception):
    """The metrics address cannot be listened on (taken, or not this machine's)."""


class DaemonMetrics:
    """One registry per daemon: latencies observed as they happen, the rest read from the
    agent at scrape time (AgentCollector)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        add_standard_collectors(self.registry, "gpuplane_daemon_build")
        self.report_seconds = Histogram(
            "gpuplane_daemon_report_publish_seconds",
            "From publishing a job report to JetStream's ack, retries included, by report kind.",
            ["kind"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
        )
        self.upload_seconds = Histogram(
            "gpuplane_daemon_upload_seconds",
            "Storing an attempt's outputs, logs and manifest, retries included, by outcome "
            "(stored, output_too_large, upload_failed).",
            ["outcome"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
        )
        self._server = MetricsServer(self.registry)

    def observe_report(self, kind: messaging_pb2.JobReportKind.ValueType, seconds: float) -> None:
        name = _Kind.Name(kind).removeprefix("JOB_REPORT_KIND_").lower()
        self.report_seconds.labels(name).observe(seconds)

    def observe_upload(self, outcome: messaging_pb2.StopReason.ValueType, seconds: float) -> None:
        name = messaging_pb2.StopReason.Name(outcome).removeprefix("STOP_REASON_").lower()
        self.upload_seconds.labels("stored" if name == "unspecified" else name).observe(seconds)

    def watch(self, agent: Agent) -> None:
        self.registry.register(AgentCollector(agent))

    def serve(self, addr: str) -> int:
        """Starts /metrics on `addr` ("host:port"); returns the port."""
        try:
            return self._server.serve(addr)
        except OSError as exc:
            raise MetricsAddrError(f"cannot serve metrics on {addr}: {exc.strerror}") from exc

    def stop(self) -> None:
        self._server.stop()


class AgentCollector(Collector):
    """Read from the agent on the HTTP server's thread: containers are copied before they are
    walked, and what is not there yet (before start) is left out."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        yield from self._gpus()
        yield from self._attempts()
        yield from self._links()

    def _gpus(self) -> Iterator[Metric]:
        agent = self.agent
        samples = GpuSampleFamilies("gpuplane_daemon_", GPU_LABELS)
        quarantined = GaugeMetricFamily(
            "gpuplane_daemon_gpu_quarantined",
            "1 while the GPU is quarantined (not clean after an attempt), else 0.",
            labels=["host", "gpu", "model"],
        )
        gpus = {g.uuid: g for g in agent.inventory.gpus} if agent.inventory else {}
        held = dict(agent.scrubber.quarantined) if agent.scrubber else {}
        for uuid, gpu in gpus.items():
            quarantined.add_metric([agent.host_id, uuid, gpu.name], 1.0 if uuid in held else 0.0)
        busy = {
            uuid: executor.job_id
            for executor in list(agent.executors.values())
            if executor.progress is Progress.RUNNING
            for uuid in executor.dispatch.gpu_uuids
        }
        batch = agent.telemetry.latest if agent.telemetry else None
        for sample in batch.samples if batch else []:
            model = gpus[sample.gpu_uuid].name if sample.gpu_uuid in gpus else ""
            key = [agent.host_id, sample.gpu_uuid, model, busy.get(sample.gpu_uuid, "")]
            samples.add(key, sample)
        yield from samples.families()
        yield quarantined

    def _attempts(self) -> Iterator[Metric]:
        agent = self.agent
        attempts = GaugeMetricFamily(
            "gpuplane_daemon_attempts",
            "Attempts this daemon runs, by step (accepted, starting, running, uploading).",
            labels=["step"],
        )
        steps = [executor.progress for executor in list(agent.executors.values())]
        for step in Progress:
            attempts.add_metric([step.name.lower()], steps.count(step))
        yield attempts
        containers = GaugeMetricFamily(
            "gpuplane_daemon_containers",
            "This host's job containers running in the Docker engine (left out while the "
            "engine does not answer).",
        )
        runtime = agent._runtime
        if runtime is not None:
            try:
                containers.add_metric([], len(runtime.job_containers()))
            except (DockerException, OSError) as exc:  # requests' errors are OSErrors
                log.warning("metrics: listing containers failed: %s", exc)
        yield containers
        draining = GaugeMetricFamily(
            "gpuplane_daemon_draining", "1 while the host drains (takes no new work), else 0."
        )
        draining.add_metric([], 1.0 if agent.draining else 0.0)
        yield draining
        orphans = CounterMetricFamily(
            "gpuplane_daemon_orphans_removed",
            "gpuplane containers the control plane did not know, destroyed at a resync.",
        )
        orphans.add_metric([], float(agent.orphans_removed))
        yield orphans

    def _links(self) -> Iterator[Metric]:
        agent = self.agent
        bus = agent._bus
        nats_up = GaugeMetricFamily(
            "gpuplane_daemon_nats_connected", "1 while the NATS connection is up, else 0."
        )
        nats_up.add_metric([], 1.0 if bus is not None and bus.client.is_connected else 0.0)
        yield nats_up
        reconnects = CounterMetricFamily(
            "gpuplane_daemon_nats_reconnects", "NATS reconnections since start."
        )
        reconnects.add_metric([], float(bus.client.stats["reconnects"]) if bus else 0.0)
        yield reconnects
        connect = agent.connect
        cp_up = GaugeMetricFamily(
            "gpuplane_daemon_control_plane_connected",
            "1 while the Connect stream to the control plane is open (hello answered), else 0.",
        )
        cp_up.add_metric([], 1.0 if connect is not None and connect.connected.is_set() else 0.0)
        yield cp_up
        opened = CounterMetricFamily(
            "gpuplane_daemon_control_plane_streams",
            "Connect streams opened since start (more than one: reconnections).",
        )
        opened.add_metric([], float(connect.streams_opened) if connect else 0.0)
        yield opened
        telemetry = agent.telemetry
        rounds = CounterMetricFamily(
            "gpuplane_daemon_telemetry_rounds", "GPU telemetry rounds sampled since start."
        )
        rounds.add_metric([], float(telemetry.rounds) if telemetry else 0.0)
        yield rounds
        dropped = CounterMetricFamily(
            "gpuplane_daemon_telemetry_dropped",
            "Telemetry batches dropped because the Connect stream was down.",
        )
        dropped.add_metric([], float(telemetry.dropped) if telemetry else 0.0)
        yield dropped
