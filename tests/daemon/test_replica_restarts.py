"""A service replica's restarts in place, by its JobExecutor on a real Docker engine: the same
container started again with a growing backoff until the restarts are used up (then it ends
as exited, or STOPPED for liveness), a cancel during a backoff ends it at once, a daemon
restart during a backoff adopts the same container (no orphan, no second one), and the run
time is counted from the first start. A batch job is never restarted."""

from __future__ import annotations

import asyncio
import time

import docker
import pytest
from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.executor import JobExecutor
from daemon.journal import Journal
from daemon.runtime import DockerRuntime
from daemon.settings import DaemonSettings
from storage.objects import ObjectStore
from tests.daemon.conftest import Reports, make_dispatch
from tests.daemon.test_executor import executor as new_executor

K = messaging_pb2.JobReportKind
R = messaging_pb2.StopReason
pytestmark = pytest.mark.timeout(40)


def replica_dispatch(image: str, script: str, store: ObjectStore) -> messaging_pb2.DispatchMessage:
    replica = types_pb2.ServiceReplicaSpec(service_id="svc_test", port=8080)
    dispatch = make_dispatch(
        image, command=["sh", "-c", script], max_duration_seconds=3600, service_replica=replica
    )
    dispatch.bucket = store.bucket
    return dispatch


class Restarts:
    """The restarts an executor announces, with when and in which container."""

    def __init__(self, executor: JobExecutor) -> None:
        self.executor = executor
        self.seen: list[tuple[str, float, str]] = []
        self.changed = asyncio.Event()
        assert executor.replica is not None
        executor.replica.on_restart = self

    def __call__(self, text: str) -> None:
        self.seen.append((text, time.monotonic(), self.executor.container_id))
        self.changed.set()

    async def wait(self, count: int) -> None:
        async with asyncio.timeout(15):
            while len(self.seen) < count:
                self.changed.clear()
                await self.changed.wait()


def containers_of(client: docker.DockerClient, job_id: str) -> list[str]:
    found = client.containers.list(all=True, filters={"label": f"gpuplane.job={job_id}"})
    return [c.id or "" for c in found]


async def test_an_exiting_replica_restarts_in_place_with_growing_gaps_then_finishes(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
    docker_client: docker.DockerClient,
) -> None:
    settings = settings.model_copy(
        update={"replica_restart_backoff_seconds": 0.3, "replica_restart_max": 3}
    )
    dispatch = replica_dispatch(test_image, "echo run; sleep 0.2; exit 3", store)
    cleanup_containers.append(dispatch.job_id)
    reports = Reports()
    executor = new_executor(dispatch, runtime, store, settings, reports)
    restarts = Restarts(executor)
    started = time.monotonic()
    final = await executor.run()
    wall_ms = (time.monotonic() - started) * 1000

    assert [text for text, _, _ in restarts.seen] == [
        "exited with code 3; restart 1 in 0.3 s",
        "exited with code 3; restart 2 in 0.6 s",
        "exited with code 3; restart 3 in 1.2 s",
    ]
    assert len({container for _, _, container in restarts.seen}) == 1, "the same container"
    gaps = [b - a for (_, a, _), (_, b, _) in zip(restarts.seen, restarts.seen[1:], strict=False)]
    assert gaps[0] >= 0.3 + 0.2, gaps
    assert gaps[1] >= 0.6 + 0.2, gaps
    # RUNNING throughout: one attempt, restarted in place, then ended as exited.
    assert reports.without_usage() == [
        "JOB_REPORT_KIND_STARTING",
        "JOB_REPORT_KIND_RUNNING",
        "JOB_REPORT_KIND_UPLOADING",
        "JOB_REPORT_KIND_FINISHED",
    ]
    assert (final.exit_code, final.stop_reason) == (3, R.STOP_REASON_EXITED_WITH_ERROR)
    assert executor.restarts == 3
    # Its run time is the attempt's, from the first start (backoffs included), not the last
    # container run's 0.2 s.
    assert 0.3 + 0.6 + 1.2 + 4 * 0.2 <= final.run_time_ms / 1000 <= wall_ms / 1000
    manifest = {o.path: o for o in final.manifest}
    assert await store.get_bytes(manifest["logs/stdout"].key) == b"run\n" * 4
    assert containers_of(docker_client, dispatch.job_id) == []


async def test_a_cancel_during_the_backoff_ends_it_at_once(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
    docker_client: docker.DockerClient,
) -> None:
    settings = settings.model_copy(update={"replica_restart_backoff_seconds": 30.0})
    dispatch = replica_dispatch(test_image, "exit 1", store)
    cleanup_containers.append(dispatch.job_id)
    reports = Reports()
    executor = new_executor(dispatch, runtime, store, settings, reports)
    restarts = Restarts(executor)
    task = asyncio.create_task(executor.run())
    await restarts.wait(1)
    assert executor.replica is not None
    assert executor.replica.restarting
    asked = time.monotonic()
    await executor.cancel(R.STOP_REASON_SERVICE_SCALED_DOWN, "scaled down")
    final = await task
    assert time.monotonic() - asked < 3
    assert final.kind == K.JOB_REPORT_KIND_STOPPED
    assert (final.stop_reason, final.reason) == (R.STOP_REASON_SERVICE_SCALED_DOWN, "scaled down")
    assert final.run_time_ms > 0
    assert len(restarts.seen) == 1, "no restart after the stop was asked"
    assert containers_of(docker_client, dispatch.job_id) == []


async def test_failing_liveness_restarts_it_then_stops_it(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
    docker_client: docker.DockerClient,
) -> None:
    settings = settings.model_copy(
        update={"replica_restart_backoff_seconds": 0.1, "replica_restart_max": 1}
    )
    dispatch = replica_dispatch(test_image, "echo up; exec sleep 1000", store)
    cleanup_containers.append(dispatch.job_id)
    reports = Reports()
    executor = new_executor(dispatch, runtime, store, settings, reports)
    restarts = Restarts(executor)
    task = asyncio.create_task(executor.run())
    await reports.wait_for(K.JOB_REPORT_KIND_RUNNING)
    replica = executor.replica
    assert replica is not None
    await replica.fail_liveness("failed its health probe 3 times in a row: HTTP 500")
    await restarts.wait(1)
    assert restarts.seen[0][0] == (
        "failed its health probe 3 times in a row: HTTP 500; restart 1 in 0.1 s"
    )
    async with asyncio.timeout(10):
        while replica.restarting:
            await asyncio.sleep(0.02)
    assert await asyncio.to_thread(
        lambda: docker_client.containers.get(executor.container_id).status == "running"
    )
    await replica.fail_liveness("failed its health probe 3 times in a row: refused")
    final = await task
    assert final.kind == K.JOB_REPORT_KIND_STOPPED
    assert final.stop_reason == R.STOP_REASON_LIVENESS_FAILED
    assert final.reason == "failed its health probe 3 times in a row: refused"
    assert len(restarts.seen) == 1
    assert containers_of(docker_client, dispatch.job_id) == []


async def test_a_daemon_restart_during_the_backoff_adopts_the_same_container(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
    docker_client: docker.DockerClient,
) -> None:
    settings = settings.model_copy(
        update={"replica_restart_backoff_seconds": 0.5, "replica_restart_max": 1}
    )
    dispatch = replica_dispatch(test_image, "sleep 0.3; exit 2", store)
    cleanup_containers.append(dispatch.job_id)
    journal = Journal(settings.journal_dir)
    first = new_executor(dispatch, runtime, store, settings, Reports(), journal)
    restarts = Restarts(first)
    task = asyncio.create_task(first.run())
    await restarts.wait(1)
    await asyncio.sleep(0.05)  # journaled just after it is announced
    task.cancel()  # the daemon stops during the backoff: the container is left as it is
    await asyncio.gather(task, return_exceptions=True)
    [container_id] = containers_of(docker_client, dispatch.job_id)
    entry = journal.get(dispatch.job_id, 1)
    assert entry is not None
    assert (entry.restarts, entry.first_started > 0) == (1, True)

    reports = Reports()
    adopter = new_executor(dispatch, runtime, store, settings, reports, journal)
    again = Restarts(adopter)
    adopted = asyncio.create_task(
        adopter.run(adopt=docker_client.containers.get(container_id), journaled=entry)
    )
    await again.wait(1)
    assert again.seen[0][0] == "exited with code 2; restart 2 in 0.5 s", "counted on"
    assert again.seen[0][2] == container_id
    assert containers_of(docker_client, dispatch.job_id) == [container_id], "no second one"
    final = await adopted
    assert (final.exit_code, final.stop_reason) == (2, R.STOP_REASON_EXITED_WITH_ERROR)
    # Two runs of 0.3 s and the adopter's 0.5 s backoff at least: counted from the first
    # start (under the first daemon), not from the adopter's restart (0.3 s and less).
    assert final.run_time_ms >= 2 * 300 + 500, "from its first start, over both daemons"
    assert containers_of(docker_client, dispatch.job_id) == []


async def test_a_batch_job_is_not_restarted(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
) -> None:
    dispatch = make_dispatch(test_image, command=["sh", "-c", "exit 3"])
    dispatch.bucket = store.bucket
    cleanup_containers.append(dispatch.job_id)
    executor = new_executor(dispatch, runtime, store, settings, Reports())
    assert executor.replica is None
    final = await executor.run()
    assert (final.exit_code, final.stop_reason) == (3, R.STOP_REASON_EXITED_WITH_ERROR)
    assert executor.restarts == 0
