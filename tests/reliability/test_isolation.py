"""Job containers isolated from the host, through the whole path (control plane, NATS, S3, an
in-process daemon, the harness's dockerd with --userns-remap=default): CPU limits from the spec
or the host's share per GPU (and the memory share), a read-only root with a size-limited /tmp
scratch that a job filling it learns about, and a root in the container that is not the host's
root (remapped; or, on an engine without remapping, a non-root user)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import types_pb2

from daemon.agent import Agent
from daemon.runtime import DockerRuntime, EngineFacts
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from tests.daemon.conftest import make_dispatch
from tests.e2e.test_job_path import settings as daemon_settings
from tests.harness import JobPlane, job_plane
from tests.reliability import summary
from tests.reliability.test_hardening import run_job, stored_log

S = types_pb2
pytestmark = [pytest.mark.timeout(90), pytest.mark.docker]
SCRATCH_BYTES = 8 << 20
HOST_GPUS = 2
# The cgroup files a job reads its limits and CPU use from, on cgroup v2 or v1.
CGROUP = (
    "cg=/sys/fs/cgroup; "
    "if [ -f $cg/cpu.max ]; then echo quota $(cat $cg/cpu.max); "
    "echo memory $(cat $cg/memory.max); "
    "else echo quota $(cat $cg/cpu/cpu.cfs_quota_us) $(cat $cg/cpu/cpu.cfs_period_us); "
    "echo memory $(cat $cg/memory/memory.limit_in_bytes); fi; "
)
USAGE = (
    "usage() { if [ -f /sys/fs/cgroup/cpu.stat ]; then "
    "echo $(( $(grep usage_usec /sys/fs/cgroup/cpu.stat | cut -d' ' -f2) * 1000 )); "
    "else cat /sys/fs/cgroup/cpuacct/cpuacct.usage; fi; }; "
    "throttled() { grep nr_throttled /sys/fs/cgroup/cpu.stat /sys/fs/cgroup/cpu/cpu.stat "
    "2>/dev/null | head -1 | cut -d' ' -f2; }; "
)


@pytest.fixture(scope="module")
async def plane(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    async with job_plane(tmp_path_factory.mktemp("isolation-cp"), nats_server.url, s3_server) as p:
        yield p
        await p.assert_ledger_consistent()


@pytest.fixture(scope="module")
async def agent(
    plane: JobPlane,
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> AsyncIterator[Agent]:
    """One daemon on 2 simulated GPUs with an 8 MiB scratch; limits left to their defaults."""
    token = await plane.token()
    data_dir = tmp_path_factory.mktemp("isolation-daemon")
    base = daemon_settings(
        plane, token, data_dir, s3_server, docker_engine, f"{HOST_GPUS}xA100-80GB"
    )
    running = Agent(base.model_copy(update={"scratch_bytes": SCRATCH_BYTES}))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def fields(out: str) -> dict[str, list[str]]:
    """'name value...' lines as {name: [values]}."""
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}


async def test_cpu_limit_from_the_spec_throttles_and_defaults_to_the_hosts_share(
    plane: JobPlane, agent: Agent, docker_client: docker.DockerClient
) -> None:
    # Two busy loops for 2 s under 250 millicores: the kernel throttles them to a quarter core.
    burn = (
        "u0=$(usage); t0=$(cut -d' ' -f1 /proc/uptime); "
        "(while :; do :; done) & a=$!; (while :; do :; done) & b=$!; sleep 2; kill $a $b; "
        "echo used $(( $(usage) - u0 )) $t0 $(cut -d' ' -f1 /proc/uptime); "
        "echo throttled $(throttled)"
    )
    done = await run_job(plane, CGROUP + USAGE + burn, cpu_millicores=250)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    seen = fields(await stored_log(plane, done.job_id, S.LOG_STREAM_STDOUT))
    print(f"250m job: {seen}")
    assert seen["quota"] == ["25000", "100000"]
    used_ns, start, end = int(seen["used"][0]), float(seen["used"][1]), float(seen["used"][2])
    cores = used_ns / 1e9 / (end - start)
    assert cores < 0.25 * 1.2 + 0.02, f"used {cores:.2f} cores under a 0.25 limit"
    throttled = int(seen["throttled"][0])
    assert throttled > 0

    # No limit in the spec: the engine's CPUs and memory over the host's 2 GPUs, per GPU.
    info = docker_client.info()
    defaults = await run_job(plane, CGROUP)
    assert defaults.state == S.JOB_STATE_SUCCEEDED, defaults.state_reason
    seen = fields(await stored_log(plane, defaults.job_id, S.LOG_STREAM_STDOUT))
    share_quota = int(info["NCPU"]) * 100_000 // HOST_GPUS
    assert seen["quota"] == [str(share_quota), "100000"]
    share_memory = int(info["MemTotal"]) // HOST_GPUS
    # The kernel rounds the limit down to whole pages.
    assert abs(int(seen["memory"][0]) - share_memory) < 4096
    summary.record(
        "isolation: CPU limit",
        f"2 busy loops under 250m used {cores:.2f} cores, throttled "
        f"{throttled} times; no spec: quota {share_quota}/100000 and memory "
        f"{share_memory >> 20} MiB (host / {HOST_GPUS} GPUs)",
        faults_injected=1,
        jobs_run=2,
    )


async def test_read_only_root_and_a_size_limited_scratch(plane: JobPlane, agent: Agent) -> None:
    script = (
        "touch /etc/gpuplane 2>&1; touch /x 2>&1; "
        "echo hi > /tmp/ok && echo scratch writable; "
        "echo size $(df -k /tmp | tail -1 | awk '{print $2}'); "
        "echo cache $XDG_CACHE_HOME; "
        "echo result > /output/r && echo output writable"
    )
    done = await run_job(plane, script)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    out = await stored_log(plane, done.job_id, S.LOG_STREAM_STDOUT)
    print(f"read-only root: {out!r}")
    assert out.count("Read-only file system") == 2
    seen = fields(out)
    assert "scratch" in seen
    assert "output" in seen
    assert seen["size"] == [str(SCRATCH_BYTES >> 10)]
    assert seen["cache"] == ["/tmp/.cache"]

    # Past the scratch's size the write fails, and the job (exiting on it) says why.
    fill = await run_job(plane, "set -e; dd if=/dev/zero of=/tmp/fill bs=1M count=16; echo filled")
    err = await stored_log(plane, fill.job_id, S.LOG_STREAM_STDERR)
    print(f"16 MB into an 8 MiB scratch: {fill.state_reason!r}, stderr {err!r}")
    assert fill.state == S.JOB_STATE_FAILED
    assert fill.state_reason == "exit code 1"
    assert "No space left on device" in err
    assert "filled" not in await stored_log(plane, fill.job_id, S.LOG_STREAM_STDOUT)
    summary.record(
        "isolation: read-only root, /tmp scratch",
        f"writes to / and /etc refused (read-only); /tmp {SCRATCH_BYTES >> 20} MiB: 16 MB "
        "into it FAILED (exit code 1, 'No space left on device')",
        faults_injected=3,
        jobs_run=2,
    )


async def test_root_in_the_job_is_not_the_hosts_root(
    plane: JobPlane, agent: Agent, docker_client: docker.DockerClient
) -> None:
    options = [str(o) for o in docker_client.info().get("SecurityOptions") or []]
    assert any("userns" in o for o in options), options
    script = "echo uid $(id -u); echo map $(head -1 /proc/self/uid_map); echo x > /output/f"
    done = await run_job(plane, script)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    seen = fields(await stored_log(plane, done.job_id, S.LOG_STREAM_STDOUT))
    print(f"inside the remapped container: {seen}")
    # Root inside (images that expect it work), an unprivileged id range outside.
    assert seen["uid"] == ["0"]
    inside, outside, count = (int(v) for v in seen["map"])
    assert inside == 0
    assert outside >= 1000
    assert count <= 65536
    summary.record(
        "isolation: root in the job is not the host's",
        f"uid 0 inside maps to host uid {outside} (userns-remap)",
        faults_injected=1,
        jobs_run=1,
    )


async def test_without_remapping_a_root_image_runs_as_the_job_user(
    docker_client: docker.DockerClient, test_image: str, tmp_path: Path
) -> None:
    settings = DaemonSettings(data_dir=tmp_path / "d", scratch_bytes=SCRATCH_BYTES)
    facts = EngineFacts(cpus=2, memory_bytes=4 << 30, userns=False)
    runtime = DockerRuntime(docker_client, settings, host_id="host-iso", facts=facts)
    work = tmp_path / "work"
    (work / "input").mkdir(parents=True)
    (work / "output").mkdir()
    (work / "output").chmod(0o777)
    script = "echo uid $(id -u); echo x > /tmp/s && echo x > /output/o && echo wrote"
    dispatch = make_dispatch(test_image, args=["sh", "-c", script])
    container = await runtime.run(dispatch, work)
    try:
        assert await runtime.wait(container, timeout=30) == 0
        stdout, _ = await runtime.logs(container)
    finally:
        await runtime.stop(container)
        runtime.close()
    seen = fields(stdout.decode())
    assert seen["uid"] == [settings.job_user.partition(":")[0]]
    assert "wrote" in seen
    assert re.fullmatch(r"\d+", settings.job_user.partition(":")[0])
