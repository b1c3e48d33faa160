"""A GPU left dirty by a job is quarantined until it is clean: a `gpuplane daemon run` process on
the fake libnvidia-ml.so.1 (real pynvml path) against a real control plane; a process and its
memory appear on the H100 while a job runs there and outlive it (as a process escaping its
container would). The scrub after the attempt finds them: the GPU is marked unhealthy
(quarantined, naming the process), is not offered, and a second H100 job waits; once the
process and its memory are gone, the GPU is offered again and the waiting job runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from tests.e2e.test_nvml_host import H100, online_host, write_state
from tests.harness import JobPlane, job_plane
from tests.reliability import summary
from tests.serving import stop_process

S = types_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]
MIB = 1 << 20
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_TIMED_OUT)
CLEAN_PERIOD_SECONDS = 1.0


@pytest.fixture
async def plane(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    def configure(options: dict[str, object]) -> None:
        options["telemetry_interval_ms"] = 300
        options["gpu_clean_period_seconds"] = CLEAN_PERIOD_SECONDS

    async with job_plane(tmp_path / "cp", nats_server.url, s3_server, configure=configure) as p:
        yield p
        await p.assert_ledger_consistent()


@pytest.fixture
async def daemon(
    plane: JobPlane,
    tmp_path: Path,
    fake_nvml: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> AsyncIterator[tuple[subprocess.Popen[bytes], Path]]:
    """The daemon process and the fake library's state file (idle: 500 MiB used per GPU)."""
    state = tmp_path / "nvml.state"
    write_state(state, **{"0.mem_used": 500 * MIB, "1.mem_used": 500 * MIB})
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(fake_nvml),
        "FAKE_NVML_STATE": str(state),
        "FAKE_NVML_GPUS": "2",
        "GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS": "200",
        "GPUPLANE_DAEMON_SCRUB_TIMEOUT_SECONDS": "1",
        "GPUPLANE_DAEMON_SCRUB_RECHECK_SECONDS": "0.3",
    }
    argv = [str(Path(sys.executable).parent / "gpuplane"), "daemon", "run", "--plaintext"]
    argv += ["--control-plane", plane.address, "--token", await plane.token()]
    argv += ["--data-dir", str(tmp_path / "daemon"), "--docker-host", docker_engine.base_url]
    argv += ["--price-per-gpu-hour", "1.5"]  # no S3 key: each dispatch carries its grant
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process, state
    finally:
        stop_process(process)
        print(log_path.read_text(errors="replace")[-3000:])


async def h100_of(plane: JobPlane, host_id: str) -> types_pb2.Gpu:
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    got = await registry.GetHost(
        registry_pb2.GetHostRequest(host_id=host_id), metadata=plane.auth()
    )
    return next(g for g in got.host.gpus if g.uuid == H100)


async def h100_offers(plane: JobPlane) -> int:
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    offers = await registry.ListOffers(
        registry_pb2.ListOffersRequest(gpu_type="h100"), metadata=plane.auth(plane.consumer_key)
    )
    return sum(o.free_gpu_count for o in offers.offers)


async def until(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_a_gpu_left_dirty_is_quarantined_until_clean(
    plane: JobPlane, daemon: tuple[subprocess.Popen[bytes], Path]
) -> None:
    process, state = daemon
    host = await online_host(plane, process)
    assert await h100_offers(plane) == 1

    job = await plane.submit(command=["sh", "-c", "sleep 2"], gpu_count=1, gpu_models=["H100"])
    await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING], timeout=30)
    # A process on the H100 that will outlive the job's container, holding 8 GiB.
    leftover = {"0.processes": f"4242:{8192 * MIB}", "0.mem_used": 8692 * MIB}
    write_state(state, **leftover, **{"1.mem_used": 500 * MIB})
    done = await plane.wait_for(job.job_id, TERMINAL, timeout=30)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason  # not the job's fault

    async def quarantined() -> bool:
        return not (await h100_of(plane, host.host_id)).healthy

    await until(quarantined, "the dirty H100 was never quarantined")
    gpu = await h100_of(plane, host.host_id)
    print(f"quarantined: {gpu.unhealthy_reason!r}")
    assert gpu.unhealthy_reason.startswith("quarantined by its host")
    assert "1 process(es) left on it (pid 4242)" in gpu.unhealthy_reason
    assert await h100_offers(plane) == 0

    # A second H100 job waits: the only H100 is not offered while it is dirty.
    waiting = await plane.submit(command=["sh", "-c", "true"], gpu_count=1, gpu_models=["H100"])
    await asyncio.sleep(2.0)  # a few scheduling cycles (1 s each)
    assert (await plane.get(waiting.job_id)).state == S.JOB_STATE_QUEUED

    # The process dies, its memory is freed: released, offered again, the job runs.
    cleaned_at = time.monotonic()
    write_state(state, **{"0.mem_used": 510 * MIB, "1.mem_used": 500 * MIB})

    async def healthy() -> bool:
        return (await h100_of(plane, host.host_id)).healthy

    await until(healthy, "the cleaned H100 never left quarantine")
    released = time.monotonic() - cleaned_at
    ran = await plane.wait_for(waiting.job_id, TERMINAL, timeout=30)
    assert ran.state == S.JOB_STATE_SUCCEEDED, ran.state_reason
    summary.record(
        "isolation: GPU left dirty is quarantined",
        "a leftover process (pid 4242, 8 GiB) after a job: H100 unhealthy "
        f"({gpu.unhealthy_reason!r}), 0 offered, next job QUEUED; clean again: offered after "
        f"{released:.1f}s (clean period {CLEAN_PERIOD_SECONDS:.0f}s) and the job ran",
        faults_injected=1,
        jobs_run=2,
    )


async def test_a_dispatch_onto_a_quarantined_gpu_is_refused_and_not_charged(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> None:
    """Between the scrub and the control plane hearing of it (the next telemetry round) a job
    can still be placed on the GPU: the daemon refuses it (GPU_QUARANTINED, the host's fault:
    not charged; retried elsewhere, here failed as it has no retries left)."""
    agent = Agent(
        DaemonSettings(
            control_plane=plane.address,
            plaintext=True,
            registration_token=SecretStr(await plane.token()),
            data_dir=tmp_path / "refusing-daemon",
            simulate_gpus="1xL4",
            gpu_device_requests="always",
            docker_host=docker_engine.base_url,
            heartbeat_interval_ms=200,
            telemetry_interval_ms=600_000,  # the control plane does not hear of it in time
        )
    )
    await agent.start()
    try:
        assert agent.scrubber is not None
        assert agent.inventory is not None
        gpu = agent.inventory.gpus[0].uuid
        agent.scrubber.quarantined[gpu] = "1 process(es) left on it (pid 99)"
        job = await plane.submit(command=["true"], gpu_count=1, allow_simulated=True, max_retries=0)
        done = await plane.wait_for(job.job_id, TERMINAL, timeout=30)
    finally:
        await agent.stop()
    print(f"placed on a quarantined GPU: {S.JobState.Name(done.state)} {done.state_reason!r}")
    assert done.state == S.JOB_STATE_FAILED
    why = f"host fault: GPU {gpu} is quarantined: 1 process(es) left on it (pid 99)"
    assert done.state_reason.startswith(f"attempt 1 lost: {why}; no retries left")
    assert done.charged_micro_credits == 0
    summary.record(
        "isolation: dispatch onto a quarantined GPU",
        f"refused by the daemon (GPU_QUARANTINED): {done.state_reason!r}, charged 0",
        faults_injected=1,
        jobs_run=1,
    )
