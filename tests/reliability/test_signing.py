"""Hostile providers against signed records: unsigned and mis-signed reports are refused (and
stall nothing), and a downloaded result set whose byte or provenance field was changed fails
`gpuplane jobs verify`, which names what failed."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, types_pb2

from controlplane.jobs.consumer import ReportConsumer
from daemon.gpus import GpuInventory
from daemon.provenance import HostFacts, sign_provenance
from devstack.factories import new_host
from gpuplane_cli.follow import download_all
from gpuplane_cli.main import main as cli
from gpuplane_cli.verify import EXIT_VERIFY_FAILED, save_provenance
from messaging.provenance import FILE_NAME
from messaging.signing import SIGNATURE_HEADER, SigningKey, b64, canonical
from messaging.subjects import events_subject
from storage.upload import upload_attempt
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import JobPlane
from tests.reliability import summary

S = types_pb2
K = messaging_pb2
pytestmark = [pytest.mark.timeout(60), pytest.mark.plane(heartbeat_timeout_ms=60_000)]


def consumer(plane: JobPlane) -> ReportConsumer:
    background = plane.plane.background
    assert background is not None
    assert background.report_consumer is not None
    return background.report_consumer


async def refused_after(plane: JobPlane, before: int, count: int) -> None:
    """Waits until the report consumer has refused `count` more reports."""
    async with asyncio.timeout(10):
        while consumer(plane).refused_total < before + count:
            await asyncio.sleep(0.02)


async def forge(
    host: ScriptedHost,
    dispatch: K.DispatchMessage,
    name: str,
    signature: str | None,
    **fields: Any,
) -> None:
    """A report about the host's own attempt, published on its own subject with `signature`."""
    report = K.JobReport(
        job_id=dispatch.job_id, attempt=dispatch.attempt, host_id=host.host_id, **fields
    )
    headers = {"Nats-Msg-Id": f"forged-{name}-{dispatch.job_id}"}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    await host.publish(
        events_subject(host.host_id, dispatch.job_id), report.SerializeToString(), headers
    )


async def test_unsigned_and_mis_signed_reports_are_refused(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1)
    try:
        job = await plane.submit(gpu_count=1)
        dispatch = await host.next_dispatch()
        before = consumer(plane).refused_total
        usage: dict[str, Any] = {"seq": 5, "kind": K.JOB_REPORT_KIND_USAGE, "run_time_ms": 180_000}
        running: dict[str, Any] = {"seq": 1, "kind": K.JOB_REPORT_KIND_RUNNING}
        data = K.JobReport(job_id=job.job_id).SerializeToString()
        stranger = SigningKey.generate()
        await forge(host, dispatch, "unsigned", None, **running)
        await forge(host, dispatch, "unsigned-usage", None, **usage)
        await forge(host, dispatch, "stranger", stranger.header(data), **usage)
        await forge(host, dispatch, "other-bytes", host.key.header(data), **usage)
        await forge(host, dispatch, "not-base64", "%%%", **usage)
        await refused_after(plane, before, 5)
        after = await plane.get(job.job_id)
        assert after.state == S.JOB_STATE_SCHEDULED, after.state_reason
        assert after.charged_micro_credits == 0
        # The host's own signed reports still drive the job: nothing refused stalled it.
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        await host.report(
            dispatch,
            K.JOB_REPORT_KIND_FINISHED,
            exit_code=0,
            run_time_ms=1000,
            stop_reason=K.STOP_REASON_COMPLETED,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
        assert done.charged_micro_credits < 180_000 * 2_000_000 // 3_600_000
        assert consumer(plane).refused_total == before + 5
    finally:
        await host.close()
    await plane.assert_ledger_consistent()
    summary.record(
        "unsigned and mis-signed reports",
        "5 forged (unsigned, another key, another report's signature, not base64): refused, "
        "job finished on the host's signed reports",
        faults_injected=5,
        jobs_run=1,
    )


async def finished_with_provenance(
    plane: JobPlane, host: ScriptedHost, tmp_path: Path
) -> jobs_pb2.GetResultsResponse:
    """A job whose host stored an output and reported FINISHED with signed provenance."""
    job = await plane.submit(gpu_count=1)
    dispatch = await host.next_dispatch()
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
    output = tmp_path / "output"
    output.mkdir(parents=True)
    (output / "weights.bin").write_bytes(b"trained weights " * 64)
    manifest = await upload_attempt(
        plane.plane.store, dispatch.job_id, dispatch.attempt, output, {"stdout": b"done\n"}
    )
    finished: dict[str, Any] = {"exit_code": 0, "run_time_ms": 40, "manifest": manifest}
    now = datetime.now(UTC)
    inventory = GpuInventory(host.gpus(), driver_version="550.54.15")
    signed: dict[str, Any] = sign_provenance(
        HostFacts(host.key, inventory),
        dispatch,
        host.host_id,
        {"reference": "busybox", "digest": "sha256:" + "0" * 64, "repo_digests": []},
        (now - timedelta(milliseconds=40), now),
        finished,
    )
    await host.report(
        dispatch,
        K.JOB_REPORT_KIND_FINISHED,
        **finished,
        **signed,
        stop_reason=K.STOP_REASON_COMPLETED,
    )
    await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    return await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )


def verify(
    job_id: str, root: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str]:
    code = cli(["jobs", "verify", job_id, "--dir", str(root), *extra], environ={})
    captured = capsys.readouterr()
    return code, captured.out + captured.err


async def test_a_tampered_result_or_provenance_fails_verify(
    plane: JobPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = await scripted_host(plane, gpus=1)
    try:
        results = await finished_with_provenance(plane, host, tmp_path / "host")
    finally:
        await host.close()
    job_id = results.job_id
    document = json.loads(results.provenance)
    assert document["host"]["image"]["digest"].startswith("sha256:")
    assert document["host"]["gpus"][0]["uuid"] == host.gpus()[0].uuid
    assert document["host"]["scrub"] is None
    assert document["control_plane"]["billed_run_time_ms"] == 40
    assert document["control_plane"]["control_plane_clock"]["running_at"]
    root = tmp_path / "download"
    await download_all(results, root, quiet=True)
    save_provenance(root, results.provenance)
    pinned = base64.b64encode(results.control_plane_public_key).decode()

    code, out = verify(job_id, root, capsys, "--control-plane-key", pinned)
    assert code == 0, out
    assert "both signatures, 2 outputs" in out

    # One byte of an output changed: named by its path.
    weights = root / "output" / "weights.bin"
    original = weights.read_bytes()
    weights.write_bytes(b"T" + original[1:])
    code, out = verify(job_id, root, capsys)
    assert code == EXIT_VERIFY_FAILED
    assert "output output/weights.bin: sha256" in out
    weights.write_bytes(original)

    # A provenance field changed (more billed time): the control plane's signature fails.
    tampered = json.loads((root / FILE_NAME).read_text())
    tampered["control_plane"]["billed_run_time_ms"] = 180_000
    (root / FILE_NAME).write_text(json.dumps(tampered))
    code, out = verify(job_id, root, capsys)
    assert code == EXIT_VERIFY_FAILED
    assert "control_plane_signature: does not match" in out

    # A host field changed and the document re-signed by another control plane: its key is
    # not the pinned one; trusted, the host's signature still fails.
    tampered = json.loads(results.provenance)
    tampered["host"]["gpus"][0]["name"] = "NVIDIA H100 80GB HBM3"
    forger = SigningKey.generate()
    signed = {k: tampered[k] for k in ("host", "host_signature", "control_plane")}
    tampered["control_plane_public_key"] = b64(forger.public_bytes)
    tampered["control_plane_signature"] = b64(forger.sign(canonical(signed)))
    (root / FILE_NAME).write_text(json.dumps(tampered))
    code, out = verify(job_id, root, capsys, "--control-plane-key", pinned)
    assert code == EXIT_VERIFY_FAILED
    assert "control_plane_public_key: not the control plane's key" in out
    code, out = verify(job_id, root, capsys)
    assert code == EXIT_VERIFY_FAILED
    assert "host_signature: does not match" in out
    summary.record(
        "a tampered result byte and a tampered provenance field",
        "1 output byte, billed time, a GPU name re-signed by another key: `jobs verify` "
        "failed naming each",
        faults_injected=3,
        jobs_run=1,
    )


async def test_a_key_that_is_not_ed25519_is_refused_at_registration(plane: JobPlane) -> None:
    for key in (b"short", b"x" * 33):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await new_host(plane.channel, await plane.token(), signing_public_key=key)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "signing_public_key" in str(caught.value.details())
    summary.record(
        "a signing key that is not a raw Ed25519 key",
        "2 registrations (5 and 33 bytes): INVALID_ARGUMENT naming signing_public_key",
        requests_tried=2,
    )


async def run_to_the_end(plane: JobPlane, host: ScriptedHost) -> types_pb2.Job:
    job = await plane.submit(gpu_count=1)
    dispatch = await host.next_dispatch()
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await host.report(
        dispatch,
        K.JOB_REPORT_KIND_FINISHED,
        exit_code=0,
        run_time_ms=500,
        stop_reason=K.STOP_REASON_COMPLETED,
    )
    return job


async def test_a_host_without_a_key_is_refused_while_signatures_are_required(
    plane: JobPlane,
) -> None:
    old = await scripted_host(plane, gpus=1, signed=False)
    try:
        before = consumer(plane).refused_total
        job = await run_to_the_end(plane, old)
        await refused_after(plane, before, 2)
        assert (await plane.get(job.job_id)).state == S.JOB_STATE_SCHEDULED
    finally:
        await old.close()
    summary.record(
        "a host of an earlier release (no key), signatures required",
        "2 unsigned reports: refused (no_host_key)",
        faults_injected=2,
    )


@pytest.mark.plane(heartbeat_timeout_ms=60_000, require_signed_reports=False)
async def test_signatures_not_required_admit_only_hosts_without_a_key(plane: JobPlane) -> None:
    old = await scripted_host(plane, gpus=1, signed=False)
    try:
        job = await run_to_the_end(plane, old)
        await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    finally:
        await old.close()
    # Another model, asked for by name: the old host stays online (heartbeat timeout 60 s)
    # with its GPU free again, and must not take this job.
    new = await scripted_host(plane, gpus=1, model="NVIDIA H100 80GB HBM3")
    try:
        job = await plane.submit(gpu_count=1, gpu_models=["H100"])
        dispatch = await new.next_dispatch()
        before = consumer(plane).refused_total
        running: dict[str, Any] = {"seq": 1, "kind": K.JOB_REPORT_KIND_RUNNING}
        await forge(new, dispatch, "unsigned", None, **running)
        await refused_after(plane, before, 1)
        assert (await plane.get(job.job_id)).state == S.JOB_STATE_SCHEDULED
    finally:
        await new.close()
    await plane.assert_ledger_consistent()
    summary.record(
        "signatures not required (upgrade)",
        "a keyless host's job ran; a keyed host's unsigned report still refused",
        faults_injected=1,
        jobs_run=2,
    )
