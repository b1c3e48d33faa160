"""The real daemon signs: its reports pass the control plane's check, its FINISHED carries
provenance the control plane countersigns, and the downloaded results verify offline; a host
registered by an earlier release (host.json, no host.key) must register again."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from daemon.agent import Agent
from daemon.identity import RegistrationError
from devstack import DockerEngine, S3Server
from gpuplane_cli.follow import download_all
from gpuplane_cli.main import main as cli
from gpuplane_cli.verify import save_provenance
from tests.daemon.test_agent import daemon_settings
from tests.harness import JobPlane

S = types_pb2
pytestmark = [pytest.mark.timeout(60), pytest.mark.docker]


async def test_a_daemons_results_verify_offline(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = daemon_settings(
        plane, await plane.token(), tmp_path / "daemon", s3_server, docker_engine
    )
    agent = Agent(settings)
    await agent.start()
    try:
        assert os.stat(settings.signing_key_file).st_mode & 0o777 == 0o600
        job = await plane.submit(
            image=test_image, command=["sh", "-c", "echo 42 > /output/answer.txt"], gpu_count=1
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED])
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    finally:
        await agent.stop()
    results = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    document = json.loads(results.provenance)
    host = document["host"]
    image_id = docker_client.images.get(test_image).id
    assert host["image"]["digest"] == image_id
    assert image_id.startswith("sha256:")
    assert [g["uuid"] for g in host["gpus"]] == list(done.gpu_uuids)
    assert all(g["name"] for g in host["gpus"])
    assert host["exit_code"] == 0
    # The GPUs' scrub attestation is part of what the host signed (daemon/scrub.py).
    assert host["scrub"]["clean"] is True
    assert [g["gpu_uuid"] for g in host["scrub"]["gpus"]] == list(done.gpu_uuids)
    assert {o["path"] for o in host["outputs"]} >= {"output/answer.txt", "logs/stdout"}
    root = tmp_path / job.job_id
    await download_all(results, root, quiet=True)
    save_provenance(root, results.provenance)
    pinned = base64.b64encode(results.control_plane_public_key).decode()
    code = cli(
        ["jobs", "verify", job.job_id, "--dir", str(root), "--control-plane-key", pinned],
        environ={},
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"job {job.job_id} attempt 1: both signatures" in out.out


async def test_a_host_without_a_key_must_register_again(
    plane: JobPlane, tmp_path: Path, s3_server: S3Server, docker_engine: DockerEngine
) -> None:
    data_dir = tmp_path / "daemon"
    data_dir.mkdir()
    (data_dir / "host.json").write_text(
        json.dumps({"host_id": "host-old", "host_credential": "x", "control_plane": "y"})
    )
    (data_dir / "host.json").chmod(0o600)
    agent = Agent(daemon_settings(plane, None, data_dir, s3_server, docker_engine))
    with pytest.raises(RegistrationError, match="without a signing key.*--token"):
        await agent.start()
    await agent.stop()
