"""What the CLI says about a job, against a real control plane with the daemon played by the
test: `submit --wait` shows the tail of stderr when the job fails, `jobs cancel` on a running
job says the cancel was requested, and `jobs get` shows a lost attempt as LOST."""

from __future__ import annotations

import asyncio

import pytest
from gpuplane.v1 import messaging_pb2, types_pb2

from gpuplane_cli.main import main
from storage import layout
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

K = messaging_pb2
S = types_pb2
PRICE = 2_000_000


async def cli(plane: JobPlane, *argv: str) -> int:
    """`gpuplane` as the consumer, in a thread: it runs its own event loop."""
    environ = {"GPUPLANE_ADDR": plane.address, "GPUPLANE_PLAINTEXT": "1"}
    words = ["--api-key", plane.consumer_key, *argv]
    return await asyncio.to_thread(main, words, environ)


async def test_wait_prints_the_tail_of_stderr_when_the_job_fails(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    submit = "jobs", "submit", "--image", "busybox", "--max-duration", "1m", "--wait"
    try:
        waiting = asyncio.create_task(cli(plane, *submit, "--", "sh", "-c", "exit 3"))
        d = await host.next_dispatch(timeout=30)
        prefix = layout.attempt_prefix(d.job_id, d.attempt)
        stderr = b"".join(f"line {i}\n".encode() for i in range(30)) + b"Error: out of cheese"
        manifest = []
        for name, data in (("stdout", b"working\n"), ("stderr", stderr)):
            await plane.plane.store.put_bytes(f"{prefix}logs/{name}", data)
            manifest.append(
                S.ResultObject(
                    key=f"{prefix}logs/{name}", path=f"logs/{name}", size_bytes=len(data)
                )
            )
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            d, K.JOB_REPORT_KIND_FINISHED, exit_code=3, run_time_ms=1000, manifest=manifest
        )
        code = await asyncio.wait_for(waiting, timeout=60)
    finally:
        await host.close()
    out, err = capsys.readouterr()
    assert code == 9, err
    assert "FAILED" in out
    assert "working" in out
    assert "--- last 20 lines of stderr ---" in err
    assert "Error: out of cheese" in err
    assert "line 11\n" in err
    assert "line 10\n" not in err  # only the tail


async def test_cancel_of_a_running_job_says_cancel_requested(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1)
        d = await host.next_dispatch()
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        capsys.readouterr()
        assert await cli(plane, "jobs", "cancel", job.job_id, "--reason", "enough") == 0
        out = capsys.readouterr().out
        assert out.startswith(f"job {job.job_id} cancel requested"), out
        assert "RUNNING" not in out.split("(")[0]
        await host.report(
            d, K.JOB_REPORT_KIND_STOPPED, stop_reason=K.STOP_REASON_CANCELLED, run_time_ms=1000
        )
        await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED])
        assert await cli(plane, "jobs", "cancel", job.job_id) == 0
        assert capsys.readouterr().out == f"job {job.job_id} CANCELLED\n"
    finally:
        await host.close()


async def test_get_shows_a_lost_attempt_as_lost(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, max_retries=1)
        d1 = await host.next_dispatch()
        await host.report(d1, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            d1,
            K.JOB_REPORT_KIND_STOPPED,
            stop_reason=K.STOP_REASON_HOST_ERROR,
            reason="docker died",
            run_time_ms=5000,
        )
        d2 = await host.next_dispatch()
        assert d2.attempt == 2
        shown = await plane.get(job.job_id)
        assert shown.attempts[0].attempt_state == S.ATTEMPT_STATE_LOST
        assert shown.attempts[0].state == S.JOB_STATE_UNSPECIFIED  # as earlier releases saw it
        capsys.readouterr()
        assert await cli(plane, "jobs", "get", job.job_id) == 0
        out = capsys.readouterr().out
    finally:
        await host.close()
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert rows[0][1] == "LOST", out
    assert rows[1][1] in ("SCHEDULED", "STARTING", "RUNNING"), out
