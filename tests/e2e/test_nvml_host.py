"""A `gpuplane daemon run` process on the fake libnvidia-ml.so.1 (the real pynvml path, no
--simulate-gpus) against a real control plane: its NVML fingerprint shows in GetHost and
ListOffers, and a telemetry value changed in the library reaches /metrics within two
telemetry intervals."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from devstack import DockerEngine, NatsServer, S3Server
from tests.harness import JobPlane, job_plane
from tests.serving import stop_process

pytestmark = [pytest.mark.timeout(90), pytest.mark.docker]

H100 = "GPU-fa4e0000-0000-0000-0000-000000000000"
RTX = "GPU-fa4e0000-0000-0000-0000-000000000001"
INTERVAL_MS = 1000


@pytest.fixture
async def plane(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    def configure(options: dict[str, object]) -> None:
        options["telemetry_interval_ms"] = INTERVAL_MS

    async with job_plane(tmp_path / "cp", nats_server.url, s3_server, configure=configure) as p:
        yield p


@pytest.fixture
def nvml_state(tmp_path: Path) -> Path:
    return tmp_path / "nvml.state"


def write_state(path: Path, **values: object) -> None:
    """Renamed into place so the fake library sees a new file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(f"{k.replace('__', '.')}={v}\n" for k, v in values.items()))
    os.replace(temporary, path)


@pytest.fixture
async def daemon(
    plane: JobPlane,
    tmp_path: Path,
    fake_nvml: Path,
    nvml_state: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
) -> AsyncIterator[subprocess.Popen[bytes]]:
    async with nvml_daemon(
        plane, tmp_path, fake_nvml, nvml_state, s3_server, docker_engine
    ) as process:
        yield process


@asynccontextmanager
async def nvml_daemon(
    plane: JobPlane,
    tmp_path: Path,
    fake_nvml: Path,
    nvml_state: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    gpus: int = 2,
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A `gpuplane daemon run` process on the fake NVML library with `gpus` GPUs (the first
    an H100, the second an RTX 4090)."""
    token = await plane.token()
    write_state(nvml_state, **{"0.temp": 40, "1.temp": 35})
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(fake_nvml),
        "FAKE_NVML_STATE": str(nvml_state),
        "FAKE_NVML_GPUS": str(gpus),
        "GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS": "200",
    }
    log_path = tmp_path / "daemon.log"
    gpuplane = Path(sys.executable).parent / "gpuplane"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(gpuplane),
                "daemon",
                "run",
                "--plaintext",
                "--control-plane",
                plane.address,
                "--token",
                token,
                "--data-dir",
                str(tmp_path / "daemon"),
                "--docker-host",
                docker_engine.base_url,
                "--price-per-gpu-hour",
                "1.75",
                "--location",
                "eu-west",
                "--label",
                "rack=r7",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        stop_process(process)
        if process.returncode not in (0, -15):
            print(log_path.read_text(errors="replace"))


async def online_host(plane: JobPlane, process: subprocess.Popen[bytes]) -> types_pb2.Host:
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the daemon exited with {process.returncode}"
        listed = await registry.ListHosts(registry_pb2.ListHostsRequest(), metadata=plane.auth())
        for host in listed.hosts:
            if host.state == types_pb2.HOST_STATE_ONLINE:
                got = await registry.GetHost(
                    registry_pb2.GetHostRequest(host_id=host.host_id), metadata=plane.auth()
                )
                return got.host
        await asyncio.sleep(0.1)
    raise AssertionError("the NVML daemon never came online")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def gauge(text: str, name: str, host_id: str, gpu: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'gpu="{gpu}"' in line and f'host="{host_id}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_nvml_fingerprint_in_get_host_and_offers_and_telemetry_in_metrics(
    plane: JobPlane, daemon: subprocess.Popen[bytes], nvml_state: Path
) -> None:
    host = await online_host(plane, daemon)
    assert host.simulated is False
    assert (host.driver_version, host.cuda_driver_version) == ("550.54.15", "12.4")
    assert host.location == "eu-west"
    assert dict(host.labels) == {"rack": "r7"}
    assert host.price_per_gpu_hour_micro_credits == 1_750_000
    gpus = {g.uuid: g for g in host.gpus}
    assert set(gpus) == {H100, RTX}
    h100 = gpus[H100]
    assert h100.name == "NVIDIA H100 80GB HBM3"
    assert h100.memory_total_bytes == 80 << 30
    assert h100.compute_capability == "9.0"
    assert h100.pci_bus_id == "00000000:18:00.0"
    assert h100.mig_mode == types_pb2.MIG_MODE_DISABLED
    assert h100.power_limit_milliwatts == 400_000
    assert gpus[RTX].mig_mode == types_pb2.MIG_MODE_NOT_SUPPORTED
    assert gpus[RTX].compute_capability == "8.9"

    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    offers = await registry.ListOffers(
        registry_pb2.ListOffersRequest(gpu_type="h100", min_vram_gib=80),
        metadata=plane.auth(plane.consumer_key),
    )
    assert [(o.host_id, o.gpu_model) for o in offers.offers] == [
        (host.host_id, "NVIDIA H100 80GB HBM3")
    ]
    offer = offers.offers[0]
    assert (offer.vram_gib, offer.free_gpu_count, offer.compute_capability) == (80, 1, "9.0")
    assert (offer.location, offer.simulated) == ("eu-west", False)
    assert offer.price_per_gpu_hour_micro_credits == 1_750_000

    # The first samples arrive; then a value changed in the library reaches /metrics.
    url = f"http://127.0.0.1:{plane.plane.metrics_port}/metrics"
    deadline = time.monotonic() + 3 * INTERVAL_MS / 1000 + 5
    name = "gpuplane_gpu_temperature_celsius"
    while gauge(await asyncio.to_thread(scrape, url), name, host.host_id, H100) != 40:
        assert time.monotonic() < deadline, "no telemetry from the NVML daemon in /metrics"
        await asyncio.sleep(0.05)
    write_state(nvml_state, **{"0.temp": 83, "0.power_mw": 612_345, "1.temp": 35})
    changed_at = time.monotonic()
    while True:
        text = await asyncio.to_thread(scrape, url)
        if gauge(text, name, host.host_id, H100) == 83:
            break
        elapsed = time.monotonic() - changed_at
        assert elapsed < 2 * INTERVAL_MS / 1000, f"not in /metrics after {elapsed:.2f}s"
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - changed_at
    print(f"\n[timing] NVML change → /metrics in {elapsed:.2f}s (interval {INTERVAL_MS} ms)")
    assert gauge(text, "gpuplane_gpu_power_watts", host.host_id, H100) == pytest.approx(612.345)
    assert gauge(text, "gpuplane_gpu_temperature_celsius", host.host_id, RTX) == 35
