"""DockerRuntime against a real engine: GPUs by UUID, hardening, limits, logs, exit info."""

from __future__ import annotations

import time
from pathlib import Path

import docker
import pytest

from daemon.gpus import GpuInventory
from daemon.runtime import DockerRuntime, ImagePullFailed, parse_docker_time
from tests.daemon.conftest import make_dispatch


def work_dir(tmp_path: Path) -> Path:
    for sub in ("input", "output"):
        (tmp_path / "work" / sub).mkdir(parents=True, exist_ok=True)
    (tmp_path / "work" / "output").chmod(0o777)
    return tmp_path / "work"


async def test_container_gets_exactly_its_gpus_and_is_hardened(
    runtime: DockerRuntime,
    inventory: GpuInventory,
    test_image: str,
    tmp_path: Path,
    cleanup_containers: list[str],
    docker_client: docker.DockerClient,
) -> None:
    uuids = [inventory.gpus[1].uuid, inventory.gpus[3].uuid]
    dispatch = make_dispatch(
        test_image,
        args=["sh", "-c", "env; echo oops >&2; exit 3"],
        gpu_uuids=uuids,
        env={"NVIDIA_VISIBLE_DEVICES": "all", "FOO": "bar"},
        memory_bytes=256 << 20,
        cpu_millicores=500,
    )
    cleanup_containers.append(dispatch.job_id)
    container = await runtime.run(dispatch, work_dir(tmp_path))
    assert await runtime.wait(container, timeout=20) == 3
    info = docker_client.api.inspect_container(container.id)
    env = info["Config"]["Env"]
    visible = [e for e in env if e.startswith("NVIDIA_VISIBLE_DEVICES=")]
    assert visible == [f"NVIDIA_VISIBLE_DEVICES={','.join(uuids)}"]
    assert "FOO=bar" in env
    assert f"GPUPLANE_JOB_ID={dispatch.job_id}" in env
    assert "GPUPLANE_ATTEMPT=1" in env
    host = info["HostConfig"]
    assert host["DeviceRequests"][0]["DeviceIDs"] == uuids
    assert host["DeviceRequests"][0]["Driver"] == "nvidia"
    assert host["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["NetworkMode"] == "none"
    assert host["PidsLimit"] == 1024
    assert host["Memory"] == 256 << 20
    assert host["NanoCpus"] == 500_000_000
    assert host["ShmSize"] == 64 << 20
    labels = info["Config"]["Labels"]
    assert labels["gpuplane.job"] == dispatch.job_id
    assert labels["gpuplane.host"] == "host-test"
    stdout, stderr = await runtime.logs(container)
    assert f"NVIDIA_VISIBLE_DEVICES={','.join(uuids)}".encode() in stdout
    assert stderr == b"oops\n"
    exit_info = await runtime.inspect(container)
    assert exit_info.exit_code == 3
    assert not exit_info.oom_killed
    found = await runtime.find_by_label(job=dispatch.job_id)
    assert [c.id for c in found] == [container.id]
    await runtime.stop(container)
    assert await runtime.find_by_label(job=dispatch.job_id) == []


async def test_absent_image_that_cannot_be_pulled_is_a_readable_error(
    runtime: DockerRuntime,
) -> None:
    with pytest.raises(ImagePullFailed) as caught:  # the registry is unreachable
        await runtime.ensure_image("127.0.0.1:1/nope/missing:1")
    message = str(caught.value)
    assert message.startswith(
        "image '127.0.0.1:1/nope/missing:1' is not on this host and could not be pulled: "
    )
    assert "\n" not in message


async def test_wait_times_out_then_stop_is_fast(
    runtime: DockerRuntime, test_image: str, tmp_path: Path, cleanup_containers: list[str]
) -> None:
    dispatch = make_dispatch(test_image, args=["sleep", "60"])
    cleanup_containers.append(dispatch.job_id)
    container = await runtime.run(dispatch, work_dir(tmp_path))
    assert await runtime.wait(container, timeout=0.3) is None
    started = time.monotonic()
    await runtime.stop(container)
    assert time.monotonic() - started < 5
    assert await runtime.find_by_label(job=dispatch.job_id) == []


def test_parse_docker_time() -> None:
    parsed = parse_docker_time("2024-05-01T12:00:01.123456789Z")
    assert parsed is not None
    assert parsed.microsecond == 123456
    assert parse_docker_time("0001-01-01T00:00:00Z") is None
