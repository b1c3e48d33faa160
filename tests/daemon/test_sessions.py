"""A session's container on a real Docker engine, without a control plane: a TTY and open
stdin keep `sh` up, the SSH keys are in it, and its daemon stops it at its own deadline
(moved by an extension), STOPPED with STOP_REASON_TIMED_OUT; an ExtendCommand moves the
deadline and the journaled dispatch, and never bars a dispatch not taken yet."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import messaging_pb2, registry_pb2, types_pb2

from daemon.agent import Agent
from daemon.executor import JobExecutor
from daemon.journal import JournalEntry
from daemon.runtime import DockerRuntime
from daemon.sessions import MAX_SESSION_SECONDS, SessionDeadline
from daemon.settings import DaemonSettings
from storage.objects import ObjectStore
from tests.daemon.conftest import Reports, make_dispatch

A = registry_pb2.CommandAnswer
K = messaging_pb2.JobReportKind
R = messaging_pb2.StopReason
pytestmark = pytest.mark.timeout(40)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnyiHyW0lHc+ZtFDYeGfnWCTZh2Hp3ojQ0Q0aFxT4pW a@b"


def session_dispatch(image: str, seconds: int) -> messaging_pb2.DispatchMessage:
    session = types_pb2.SessionSpec(ssh_public_keys=[KEY])
    return make_dispatch(image, max_duration_seconds=seconds, session=session)


async def test_the_daemon_destroys_a_session_at_its_deadline_moved_by_an_extension(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
    docker_client: docker.DockerClient,
) -> None:
    dispatch = session_dispatch(test_image, 2)
    dispatch.bucket = store.bucket
    cleanup_containers.append(dispatch.job_id)
    reports = Reports()
    executor = JobExecutor(
        dispatch,
        host_id="host-test",
        runtime=runtime,
        store=store,
        settings=settings,
        report=reports,
    )
    deadline = SessionDeadline(executor, dispatch.spec.max_duration_seconds, tick=0.02)
    deadline.start()
    run = asyncio.create_task(executor.run())
    await reports.wait_for(K.JOB_REPORT_KIND_RUNNING)
    started = time.monotonic()

    (container,) = docker_client.containers.list(
        filters={"label": f"gpuplane.job={dispatch.job_id}"}
    )
    config = container.attrs["Config"]
    assert (config["Tty"], config["OpenStdin"]) == (True, True)
    assert container.attrs["HostConfig"]["NetworkMode"] == "none"
    listing = container.exec_run(["ls", "-ln", "/root/.ssh"], user="0").output.decode()
    assert listing.split()[2:5] == ["-rw-------", "1", "0"], listing  # mode 600, root's
    keys = container.exec_run(["cat", "/root/.ssh/authorized_keys"], user="0").output
    assert keys.decode() == KEY + "\n"
    folder = container.exec_run(["stat", "-c", "%a", "/root/.ssh"], user="0").output
    assert folder.decode().strip() == "700"

    deadline.extend(3)  # the control plane's ExtendCommand: 3 s from the start in all
    final = await asyncio.wait_for(run, 20)
    elapsed = time.monotonic() - started
    assert final.kind == K.JOB_REPORT_KIND_STOPPED
    assert final.stop_reason == R.STOP_REASON_TIMED_OUT
    assert "session expired" in final.reason
    assert elapsed >= 2.8, "stopped at its first deadline, not the extended one"
    assert 2800 <= final.run_time_ms <= 3000 + 2000
    assert (
        docker_client.containers.list(
            all=True, filters={"label": f"gpuplane.job={dispatch.job_id}"}
        )
        == []
    )
    deadline.close()


async def test_a_deadline_is_never_past_twelve_hours(
    runtime: DockerRuntime, store: ObjectStore, settings: DaemonSettings, test_image: str
) -> None:
    dispatch = session_dispatch(test_image, 10)
    executor = JobExecutor(
        dispatch,
        host_id="host-test",
        runtime=runtime,
        store=store,
        settings=settings,
        report=Reports(),
    )
    deadline = SessionDeadline(executor, 13 * 3600)
    assert deadline.seconds == MAX_SESSION_SECONDS
    deadline.extend(100 * 3600)
    assert deadline.seconds == MAX_SESSION_SECONDS
    assert deadline.remaining() is None  # not started: nothing counts yet


async def test_extend_answers_and_the_journaled_dispatch(
    tmp_path: Path, runtime: DockerRuntime, store: ObjectStore, test_image: str
) -> None:
    agent = Agent(DaemonSettings(data_dir=tmp_path / "agent"))
    dispatch = session_dispatch(test_image, 60)
    key = (dispatch.job_id, 1)
    executor = JobExecutor(
        dispatch,
        host_id="h",
        runtime=runtime,
        store=store,
        settings=agent.settings,
        report=Reports(),
    )
    encoded = base64.b64encode(dispatch.SerializeToString()).decode()
    agent.journal.write(JournalEntry(*key, dispatch_b64=encoded))
    agent.executors[key] = executor
    agent.deadlines[key] = SessionDeadline(executor, 60)

    assert await agent.on_command(extend(dispatch.job_id, 1, 90)) == A.COMMAND_ANSWER_APPLIED
    assert agent.deadlines[key].seconds == 90
    entry = agent.journal.get(*key)
    assert entry is not None
    journaled = messaging_pb2.DispatchMessage.FromString(base64.b64decode(entry.dispatch_b64))
    assert journaled.spec.max_duration_seconds == 90  # a restarted daemon adopts it so

    # Not taken yet: asked again later, and its dispatch is still run when it comes.
    assert await agent.on_command(extend("not-yet", 1, 90)) is None
    assert ("not-yet", 1) not in agent._ended
    agent._ended_attempt(("over", 1))
    assert await agent.on_command(extend("over", 1, 90)) == A.COMMAND_ANSWER_APPLIED
    assert agent.journal.get("over", 1) is None


def extend(job_id: str, attempt: int, seconds: int) -> registry_pb2.ControlMessage:
    command = registry_pb2.ExtendCommand(
        job_id=job_id, attempt=attempt, max_duration_seconds=seconds
    )
    return registry_pb2.ControlMessage(extend=command, command_id=9)
