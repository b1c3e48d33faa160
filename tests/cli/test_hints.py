"""Usage mistakes get what was meant: a misspelt command its closest match, a job command
without `--` the command line with it; `jobs logs` of a job that has not started says so."""

from __future__ import annotations

import asyncio
import time

import pytest
from gpuplane.v1 import jobs_pb2, jobs_pb2_grpc

from devstack.factories import bearer, new_job
from gpuplane_cli.main import main
from tests.harness import JobPlane


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs the CLI expecting a usage error (exit 2); returns its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv), environ={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["jbos", "list"], "gpuplane: unknown command 'jbos'; did you mean 'jobs'?"),
        (["jobs", "lsit"], "gpuplane: unknown command 'jobs lsit'; did you mean 'jobs list'?"),
        (["hosts", "darin", "h1"],
         "gpuplane: unknown command 'hosts darin'; did you mean 'hosts drain'?"),
        (["ledger", "balanse"],
         "gpuplane: unknown command 'ledger balanse'; did you mean 'ledger balance'?"),
        (["--json", "jbos", "list"], "gpuplane: unknown command 'jbos'; did you mean 'jobs'?"),
    ],
)  # fmt: skip
def test_a_misspelt_command_gets_did_you_mean(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert usage_error(capsys, *argv) == message + "\n"


def test_an_unknown_command_with_nothing_close_lists_them(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = usage_error(capsys, "jobs", "xyzzy")
    assert err.startswith("gpuplane: unknown command 'jobs xyzzy' (choose from submit, list, ")
    assert "did you mean" not in err


HINT = "hint: put `--` before the container's command and its arguments: "


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        # argparse rejects -n (and the words around it) as its own unknown arguments.
        (["jobs", "submit", "--image", "busybox", "echo", "-n", "hi"],
         "gpuplane jobs submit --image busybox -- echo -n hi"),
        # The image given as a word: it goes in --image.
        (["jobs", "submit", "busybox", "echo", "-n", "hi"],
         "gpuplane jobs submit --image busybox -- echo -n hi"),
        # argparse took --gpus and --network that follow the command: they were its arguments.
        (["jobs", "submit", "--image", "busybox", "--gpus", "2", "python", "train.py", "--gpus",
          "4", "--network"],
         "gpuplane jobs submit --image busybox --gpus 2 -- python train.py --gpus 4 --network"),
        # Part of the command before `--`, part after it.
        (["jobs", "submit", "--image=busybox", "sh", "--", "-c", "echo hi"],
         "gpuplane jobs submit --image=busybox -- sh -c 'echo hi'"),
        # A key on the command line is not echoed back.
        (["jobs", "submit", "--api-key", "gpk_secret", "--image", "busybox", "nvidia-smi"],
         "gpuplane jobs submit --api-key '…' --image busybox -- nvidia-smi"),
    ],
)  # fmt: skip
def test_a_job_command_without_dashes_gets_a_hint(
    argv: list[str], meant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(capsys, *argv)
    assert err.endswith(HINT + meant + "\n")
    assert "gpk_secret" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["jobs", "submit", "--image", "busybox", "--gpu-modle", "H100"],  # a mistyped option
        ["jobs", "submit", "--image", "busybox", "--gpus", "two", "--", "true"],  # a bad value
        ["jobs", "submit", "busybox"],  # no command at all: only --image is missing
        ["jobs", "get", "j1", "j2"],  # not a command that takes a container command
    ],
)
def test_other_usage_errors_get_no_dashes_hint(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(capsys, *argv)
    assert "hint:" not in err
    assert ": error: " in err


@pytest.mark.databases("sqlite")
async def test_logs_of_a_queued_job_say_so(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    job = await new_job(plane, plane.consumer_key)  # no host: it stays queued
    environ = {"GPUPLANE_ADDR": plane.address, "GPUPLANE_PLAINTEXT": "1"}
    argv = ["--api-key", plane.consumer_key, "jobs", "logs", job.job_id]
    capsys.readouterr()
    assert await asyncio.to_thread(main, argv, environ) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"job {job.job_id} is queued: no logs yet\n"

    # Following it: says it waits for the start, and ends when the job does (cancelled).
    follow = asyncio.ensure_future(asyncio.to_thread(main, [*argv, "--follow"], environ))
    err = ""
    deadline = time.monotonic() + 30
    while "waiting" not in err and time.monotonic() < deadline and not follow.done():
        await asyncio.sleep(0.05)
        err += capsys.readouterr().err
    assert err == f"job {job.job_id} is queued: waiting for it to start\n"
    await jobs_pb2_grpc.JobServiceStub(plane.channel).CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=bearer(plane.consumer_key)
    )
    assert await asyncio.wait_for(follow, 30) == 0
    assert capsys.readouterr().out == ""
