"""Job containers on the real Docker engine, through the whole path (control plane, NATS, S3, an
in-process daemon): no network, no capabilities, no new privileges, and the pids, memory and
/output limits each end a job that tries to exceed them, with a reason a user can read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import docker
import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from daemon.agent import Agent
from devstack import DockerEngine, NatsServer, S3Server
from storage import layout
from tests.e2e.test_job_path import settings as daemon_settings
from tests.harness import JobPlane, job_plane
from tests.reliability import summary

S = types_pb2
pytestmark = [pytest.mark.timeout(60), pytest.mark.docker]
PIDS_LIMIT = 32
OUTPUT_MAX_BYTES = 1 << 20
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_TIMED_OUT)


@pytest.fixture(scope="module")
async def plane(
    tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    data_dir = tmp_path_factory.mktemp("hardening-cp")
    async with job_plane(data_dir, nats_server.url, s3_server) as running:
        yield running
        await running.assert_ledger_consistent()


@pytest.fixture(scope="module")
async def agent(
    plane: JobPlane,
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> AsyncIterator[Agent]:
    """One daemon with small pids and /output limits (memory comes from each job's spec)."""
    token = await plane.token()
    data_dir = tmp_path_factory.mktemp("hardening-daemon")
    base = daemon_settings(plane, token, data_dir, s3_server, docker_engine, "2xA100-80GB")
    running = Agent(
        base.model_copy(
            update={"default_pids_limit": PIDS_LIMIT, "output_max_bytes": OUTPUT_MAX_BYTES}
        )
    )
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def run_job(plane: JobPlane, script: str, **spec: object) -> types_pb2.Job:
    job = await plane.submit(command=["sh", "-c", script], gpu_count=1, **spec)
    return await plane.wait_for(job.job_id, TERMINAL, timeout=60)


async def stored_log(plane: JobPlane, job_id: str, stream: types_pb2.LogStream.ValueType) -> str:
    reply = plane.jobs.StreamLogs(
        jobs_pb2.StreamLogsRequest(job_id=job_id, stream=stream),
        metadata=plane.auth(plane.consumer_key),
    )
    return b"".join([chunk.data async for chunk in reply]).decode(errors="replace")


def bridge_gateway(client: docker.DockerClient) -> str:
    config = client.networks.get("bridge").attrs["IPAM"]["Config"]
    return str(config[0].get("Gateway") or "172.17.0.1")


async def test_no_network_no_capabilities_no_new_privileges(
    plane: JobPlane,
    agent: Agent,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_client: docker.DockerClient,
) -> None:
    gateway = bridge_gateway(docker_client)
    ports = {
        "control plane": int(plane.address.rpartition(":")[2]),
        "nats": int(urlsplit(nats_server.url).port or 4222),
        "s3": s3_server.port,
    }
    targets = [(host, port) for port in ports.values() for host in ("127.0.0.1", gateway)]
    probes = " ".join(f"{host}:{port}" for host, port in targets)
    # busybox nc has no -z: an empty stdin makes it connect and quit; status 0 = connected.
    script = (
        "grep -E '^(CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status; "
        "echo interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1); "
        f"for t in {probes}; do "
        "  if nc -w 2 ${t%:*} ${t#*:} </dev/null 2>/dev/null; then echo reached $t; "
        "  else echo blocked $t; fi; "
        "done; "
        f"wget -T 2 -q -O /dev/null http://{gateway}:{s3_server.port}/ 2>/dev/null "
        "&& echo reached wget || echo blocked wget"
    )
    done = await run_job(plane, script)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    out = await stored_log(plane, done.job_id, S.LOG_STREAM_STDOUT)
    print(f"inside the network-off container (gateway {gateway}, ports {ports}):\n{out}")
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    for cap in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap].strip(), 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["interfaces"].split() == ["lo"]
    assert "reached" not in out
    assert out.count("blocked") == len(targets) + 1
    summary.record(
        "hardening: network off, caps, no-new-privileges",
        f"{len(targets) + 1} connects to cp/nats/s3 on 127.0.0.1 and {gateway} all failed; "
        "CapEff=0, NoNewPrivs=1, only lo",
        faults_injected=len(targets) + 1,
        jobs_run=1,
    )


async def test_fork_loop_is_bounded_by_the_pids_limit(plane: JobPlane, agent: Agent) -> None:
    # Forks sleepers until the kernel refuses; ash then fails with "can't fork" and, as the
    # container's PID 1, takes the rest with it.
    script = "i=0; while [ $i -lt 500 ]; do sleep 30 & i=$((i+1)); done; echo survived $i"
    done = await run_job(plane, script, max_duration_seconds=30)
    err = await stored_log(plane, done.job_id, S.LOG_STREAM_STDERR)
    out = await stored_log(plane, done.job_id, S.LOG_STREAM_STDOUT)
    print(f"fork loop under pids {PIDS_LIMIT}: {done.state_reason!r}; stderr {err[:200]!r}")
    assert "can't fork" in err
    assert "survived" not in out
    assert done.state == S.JOB_STATE_FAILED
    assert done.state_reason.startswith("exit code ")
    summary.record(
        "hardening: fork loop vs pids limit",
        f'pids limit {PIDS_LIMIT}: "can\'t fork", job FAILED ({done.state_reason})',
        faults_injected=1,
        jobs_run=1,
    )


async def test_over_the_memory_limit_is_failed_oom(plane: JobPlane, agent: Agent) -> None:
    script = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"
    done = await run_job(plane, script, memory_bytes=32 << 20)
    print(f"200 MB into a 32 MiB job: {S.JobState.Name(done.state)} {done.state_reason!r}")
    assert done.state == S.JOB_STATE_FAILED
    # A reason a user can act on: which limit, and how to ask for more.
    assert done.state_reason.startswith("oom: the job used more than its memory limit of 32 MiB")
    assert "--memory" in done.state_reason
    assert "survived" not in await stored_log(plane, done.job_id, S.LOG_STREAM_STDOUT)
    summary.record(
        "hardening: memory limit",
        f"200 MB into 32 MiB: FAILED, reason {done.state_reason!r}",
        faults_injected=1,
        jobs_run=1,
    )


async def test_output_over_the_cap_is_failed_and_not_uploaded(
    plane: JobPlane, agent: Agent
) -> None:
    size = 2 * OUTPUT_MAX_BYTES
    script = f"head -c {size} /dev/zero > /output/big.bin; echo wrote"
    done = await run_job(plane, script)
    print(f"{size} bytes into /output (cap {OUTPUT_MAX_BYTES}): {done.state_reason!r}")
    assert done.state == S.JOB_STATE_FAILED
    assert done.state_reason.startswith("upload_failed: ")
    assert f"limit of {OUTPUT_MAX_BYTES} bytes" in done.state_reason
    store = plane.plane.store
    stored = await store.list(layout.attempt_prefix(done.job_id, done.attempt))
    keys = sorted(o.key.rpartition(f"/{done.attempt}/")[2] for o in stored)
    # The logs are kept; not one byte of the outputs is.
    assert keys == ["logs/stdout", "manifest.json"] or keys == [
        "logs/stderr",
        "logs/stdout",
        "manifest.json",
    ]
    assert await stored_log(plane, done.job_id, S.LOG_STREAM_STDOUT) == "wrote\n"
    summary.record(
        "hardening: /output cap",
        f"{size} bytes over a {OUTPUT_MAX_BYTES}-byte cap: FAILED upload_failed, "
        "outputs not stored",
        faults_injected=1,
        jobs_run=1,
    )
