"""Simulated telemetry (busy GPUs look busy, idle ones idle) and the loop's cadence and drops;
PID → job attribution through /proc/<pid>/cgroup, on files and on a real container."""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import registry_pb2

from daemon.attribution import JobAttribution, container_of
from daemon.gpus import GpuInventory
from daemon.runtime import DockerRuntime
from daemon.telemetry import CLOCKS_EVENT_GPU_IDLE, SimulatedSampler, TelemetryLoop

from .conftest import make_dispatch

pytestmark = pytest.mark.timeout(20)


def test_simulated_gpus_are_busy_only_while_a_job_runs(inventory: GpuInventory) -> None:
    sampler = SimulatedSampler(list(inventory.gpus), seed=1)
    busy_uuid, idle_uuid = inventory.gpus[0].uuid, inventory.gpus[1].uuid
    samples = {s.gpu_uuid: s for s in sampler.sample({busy_uuid: "job-7"})}
    assert list(samples) == [g.uuid for g in inventory.gpus]
    busy, idle = samples[busy_uuid], samples[idle_uuid]
    assert busy.utilization_gpu_percent >= 85
    assert 0 < busy.memory_used_bytes < inventory.gpus[0].memory_total_bytes
    assert busy.power_draw_milliwatts > idle.power_draw_milliwatts > 0
    assert busy.sm_clock_mhz > idle.sm_clock_mhz
    assert [(p.job_id, p.used_memory_bytes) for p in busy.processes] == [
        ("job-7", busy.memory_used_bytes)
    ]
    assert (idle.utilization_gpu_percent, idle.memory_used_bytes, len(idle.processes)) == (0, 0, 0)
    assert idle.throttle_reasons == CLOCKS_EVENT_GPU_IDLE
    for sample in samples.values():
        assert not sample.xid_events
        assert sample.ecc_uncorrected_errors == 0
        assert sample.time.seconds > 0


async def test_the_loop_sends_one_batch_per_interval_and_counts_drops(
    inventory: GpuInventory,
) -> None:
    sent: list[registry_pb2.TelemetryBatch] = []
    connected = True

    def send(batch: registry_pb2.TelemetryBatch) -> bool:
        if connected:
            sent.append(batch)
        return connected

    loop = TelemetryLoop(SimulatedSampler(list(inventory.gpus)), send, lambda: 100, lambda: {})
    task = asyncio.create_task(loop.run())
    try:
        async with asyncio.timeout(5):
            while len(sent) < 3:
                await asyncio.sleep(0.02)
        connected = False
        rounds = loop.rounds
        async with asyncio.timeout(5):
            while loop.rounds < rounds + 2:
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert loop.dropped >= 2
    assert all(len(b.samples) == len(inventory.gpus) for b in sent)
    times = [b.time.ToMilliseconds() for b in sent]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert all(60 <= gap <= 1000 for gap in gaps), gaps  # one per interval, never a burst


@pytest.mark.parametrize(
    "line",
    [
        "12:pids:/docker/{id}",
        "0::/docker/{id}",
        "0::/system.slice/docker-{id}.scope",
        "0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope",
    ],
)
def test_container_of_reads_every_cgroup_layout(tmp_path: Path, line: str) -> None:
    container = "ab" * 32
    (tmp_path / "17").mkdir()
    (tmp_path / "17" / "cgroup").write_text(
        "1:name=systemd:/init.scope\n" + line.format(id=container)
    )
    assert container_of(17, tmp_path) == container
    assert container_of(18, tmp_path) == ""


@pytest.mark.docker
async def test_a_process_in_a_job_container_is_attributed_to_its_job(
    runtime: DockerRuntime,
    docker_client: docker.DockerClient,
    test_image: str,
    tmp_path: Path,
    cleanup_containers: list[str],
) -> None:
    dispatch = make_dispatch(test_image, command=["sleep", "30"])
    cleanup_containers.append(dispatch.job_id)
    for name in ("input", "output"):
        (tmp_path / name).mkdir()
    container = await runtime.run(dispatch, tmp_path)
    lists = 0

    def listing() -> dict[str, str]:
        nonlocal lists
        lists += 1
        return runtime.job_containers()

    attribution = JobAttribution(listing, refresh_seconds=60)
    pid = int(docker_client.api.inspect_container(container.id)["State"]["Pid"])
    assert await asyncio.to_thread(attribution.job_of, pid) == dispatch.job_id
    assert await asyncio.to_thread(attribution.job_of, pid) == dispatch.job_id
    assert await asyncio.to_thread(attribution.job_of, 1) == ""  # not in a container
    assert lists == 1
    await runtime.stop(container)
