"""The daemon stops an attempt when its budget runs out: at the dispatch's budget run time, or
on the control plane's budget stop; either way its outputs and logs are stored."""

from __future__ import annotations

import asyncio
import time

import pytest
from gpuplane.v1 import messaging_pb2

from daemon.endings import RunLimit, run_limit
from daemon.executor import JobExecutor
from daemon.runtime import DockerRuntime
from daemon.settings import DaemonSettings
from storage.objects import ObjectStore
from tests.daemon.conftest import Reports, make_dispatch

K = messaging_pb2.JobReportKind
R = messaging_pb2.StopReason
pytestmark = pytest.mark.timeout(30)
# Writes an output at once, then runs far past any limit of these tests.
SCRIPT = "echo partial > /output/partial.txt; echo started; sleep 60"


def test_the_run_limit_is_max_duration_or_the_budget_whichever_comes_first() -> None:
    dispatch = make_dispatch("img", max_duration_seconds=30)
    assert run_limit(dispatch) == RunLimit(30.0, R.STOP_REASON_TIMED_OUT)
    dispatch.budget_run_time_ms = 9_500
    assert run_limit(dispatch) == RunLimit(9.5, R.STOP_REASON_BUDGET_EXHAUSTED)
    dispatch.budget_run_time_ms = 30_000  # a tie: max_duration (the same charge)
    assert run_limit(dispatch) == RunLimit(30.0, R.STOP_REASON_TIMED_OUT)
    dispatch.budget_run_time_ms = 45_000
    assert run_limit(dispatch).reason == R.STOP_REASON_TIMED_OUT
    unlimited = make_dispatch("img", max_duration_seconds=0)
    assert run_limit(unlimited) == RunLimit(0.0, R.STOP_REASON_TIMED_OUT)
    unlimited.budget_run_time_ms = 1
    assert run_limit(unlimited) == RunLimit(0.001, R.STOP_REASON_BUDGET_EXHAUSTED)
    # An adopted container's limit counts from its start; no limit stays none.
    assert RunLimit(9.5, R.STOP_REASON_BUDGET_EXHAUSTED).after(4.0).seconds == 5.5
    assert RunLimit(9.5).after(20.0).seconds == 0.001
    assert RunLimit(0.0).after(20.0).seconds == 0.0


def executor(
    dispatch: messaging_pb2.DispatchMessage,
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    reports: Reports,
) -> JobExecutor:
    dispatch.bucket = store.bucket
    return JobExecutor(
        dispatch,
        host_id="host-test",
        runtime=runtime,
        store=store,
        settings=settings,
        report=reports,
    )


async def assert_outputs_stored(final: messaging_pb2.JobReport, store: ObjectStore) -> None:
    assert final.kind == K.JOB_REPORT_KIND_FINISHED
    assert final.stop_reason == R.STOP_REASON_BUDGET_EXHAUSTED
    manifest = {o.path: o for o in final.manifest}
    assert set(manifest) == {"output/partial.txt", "logs/stdout", "logs/stderr"}
    assert await store.get_bytes(manifest["output/partial.txt"].key) == b"partial\n"
    assert await store.get_bytes(manifest["logs/stdout"].key) == b"started\n"


async def test_the_daemon_stops_the_job_at_its_budget_and_stores_its_outputs(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
) -> None:
    dispatch = make_dispatch(test_image, command=["sh", "-c", SCRIPT], max_duration_seconds=30)
    dispatch.budget_run_time_ms = 2_000
    cleanup_containers.append(dispatch.job_id)
    reports = Reports()
    job = executor(dispatch, runtime, store, settings, reports)
    task = asyncio.create_task(job.run())
    await reports.wait_for(K.JOB_REPORT_KIND_RUNNING)
    running_at = time.monotonic()
    await reports.wait_for(K.JOB_REPORT_KIND_UPLOADING)
    stopped_after = time.monotonic() - running_at
    final = await task
    # Stopped at the budget's run time (2 s), well within 2 s of it, and its outputs stored.
    assert 1.9 <= stopped_after < 4.0, stopped_after
    assert 1_900 <= final.run_time_ms < 4_000
    assert reports.without_usage() == [
        "JOB_REPORT_KIND_STARTING",
        "JOB_REPORT_KIND_RUNNING",
        "JOB_REPORT_KIND_UPLOADING",
        "JOB_REPORT_KIND_FINISHED",
    ]
    await assert_outputs_stored(final, store)


async def test_a_budget_stop_of_a_running_job_stores_its_outputs(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
    cleanup_containers: list[str],
) -> None:
    """The control plane's budget stop ends a running job as its budget's run time does."""
    dispatch = make_dispatch(test_image, command=["sh", "-c", SCRIPT], max_duration_seconds=30)
    cleanup_containers.append(dispatch.job_id)
    reports = Reports()
    job = executor(dispatch, runtime, store, settings, reports)
    task = asyncio.create_task(job.run())
    await reports.wait_for(K.JOB_REPORT_KIND_RUNNING)
    await asyncio.sleep(0.5)  # the output is written
    await job.cancel(R.STOP_REASON_BUDGET_EXHAUSTED, "budget_exhausted")
    final = await task
    assert 0 < final.run_time_ms < 5_000
    await assert_outputs_stored(final, store)


async def test_a_budget_stop_before_the_job_runs_stops_it(
    runtime: DockerRuntime,
    store: ObjectStore,
    settings: DaemonSettings,
    test_image: str,
) -> None:
    dispatch = make_dispatch(test_image, command=["sh", "-c", SCRIPT])
    reports = Reports()
    job = executor(dispatch, runtime, store, settings, reports)
    stop = asyncio.create_task(job.cancel(R.STOP_REASON_BUDGET_EXHAUSTED, "budget_exhausted"))
    await asyncio.sleep(0)  # asked before the attempt starts
    final = await job.run()
    await stop
    assert (final.kind, final.stop_reason, final.reason) == (
        K.JOB_REPORT_KIND_STOPPED,
        R.STOP_REASON_BUDGET_EXHAUSTED,
        "budget_exhausted",
    )
    assert reports.kinds == ["JOB_REPORT_KIND_STOPPED"]
