"""Input data end to end on real servers: a 20 MB file put in parts with `gpuplane data put`,
read by a busybox job under /input (it hashes what it sees), and the daemon's own SHA-256
check refusing an object that changed in storage after its upload was recorded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from daemon.agent import Agent
from devstack import DockerEngine, NatsServer, S3Server
from gpuplane_cli.main import main
from storage.layout import input_key
from tests.e2e.test_job_path import settings
from tests.harness import JobPlane, job_plane

S = types_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]
TWENTY_MB = 20 * 1024 * 1024


@pytest.fixture
async def plane(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    async with job_plane(tmp_path / "cp", nats_server.url, s3_server) as running:
        yield running
        await running.assert_ledger_consistent()


@pytest.fixture
async def agent(
    plane: JobPlane, tmp_path: Path, s3_server: S3Server, docker_engine: DockerEngine
) -> AsyncIterator[Agent]:
    token = await plane.token()
    running = Agent(settings(plane, token, tmp_path / "d", s3_server, docker_engine, "1xA100-80GB"))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def data_put(plane: JobPlane, local: Path, key: str, *options: str) -> str:
    """`gpuplane data put [OPTIONS] LOCAL KEY` as the consumer, in a thread (it runs its own
    loop); returns the file's SHA-256."""
    argv = ["--addr", plane.address, "--plaintext", "--api-key", plane.consumer_key]
    words = [*argv, "data", "put", *options, str(local), key]
    code = await asyncio.to_thread(main, words, {})
    assert code == 0
    return hashlib.sha256(local.read_bytes()).hexdigest()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


async def test_twenty_mb_input_is_read_by_a_job_and_its_hash_checked(
    plane: JobPlane, agent: Agent, test_image: str, tmp_path: Path
) -> None:
    local = tmp_path / "train.bin"
    local.write_bytes(os.urandom(TWENTY_MB))
    # In parts of 5 MiB: the multipart path, four presigned part URLs.
    sha = await data_put(plane, local, "sets/train.bin", "--part-size", "5m")
    script = "sha256sum /input/data/train.bin > /output/sum.txt && wc -c < /input/data/train.bin"
    job = await plane.submit(
        image=test_image,
        command=["sh", "-c", script],
        gpu_count=1,
        inputs=[S.JobInput(key="sets/train.bin", path="data/train.bin")],
    )
    done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], 60)
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    # The job carries the hash recorded at upload; the daemon checked the fetched bytes.
    assert [item.sha256 for item in done.spec.inputs] == [sha]
    results = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    objects = {o.path: o for o in results.objects}
    seen = await asyncio.to_thread(fetch, objects["output/sum.txt"].url)
    assert seen.split()[0].decode() == sha
    stdout = await asyncio.to_thread(fetch, objects["logs/stdout"].url)
    assert stdout.strip() == str(TWENTY_MB).encode()


async def test_an_input_changed_in_storage_fails_verification(
    plane: JobPlane, agent: Agent, test_image: str, tmp_path: Path
) -> None:
    local = tmp_path / "weights.bin"
    local.write_bytes(os.urandom(1024 * 1024))
    sha = await data_put(plane, local, "weights.bin")
    # Someone with the storage keys replaces the bytes behind the record.
    tampered = await plane.plane.store.put_bytes(
        input_key(plane.consumer_tenant, "weights.bin"), b"not the weights"
    )
    job = await plane.submit(
        image=test_image,
        command=["sh", "-c", "cat /input/weights.bin > /output/copy.bin"],
        gpu_count=1,
        inputs=[S.JobInput(key="weights.bin")],
    )
    done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], 60)
    assert done.state == S.JOB_STATE_FAILED
    assert done.state_reason == (
        f"input 'weights.bin' is corrupt: its 15 bytes hash to sha256 {tampered.sha256}, "
        f"not {sha} as recorded when it was uploaded"
    )
    # It never ran: nothing charged, no retry on another host (the object is the same there).
    assert done.charged_micro_credits == 0
    assert len(done.attempts) == 1
    assert done.attempts[0].state == S.JOB_STATE_FAILED
