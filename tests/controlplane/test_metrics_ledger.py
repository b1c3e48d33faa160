"""The ledger's totals in /metrics (controlplane/gauges.py), on SQLite and PostgreSQL: what
deposits and a job's hold move, the holds outstanding, balances by account kind and their sum;
and unary and streaming RPCs in their own histograms."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from controlplane import gauges
from tests.e2e.test_metrics_endpoints import value
from tests.harness import CREDIT, JobPlane

pytestmark = [pytest.mark.timeout(60), pytest.mark.databases("sqlite", "postgresql")]
TOTAL = "gpuplane_ledger_transferred_micro_credits_total"


async def refreshed(plane: JobPlane) -> str:
    """/metrics right after a refresh of the gauges (the loop's own runs every 0.2 s too)."""
    assert plane.plane.db is not None
    await gauges.refresh(plane.plane.db, plane.plane.metrics)
    url = f"http://127.0.0.1:{plane.plane.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    return bytes(body).decode()


async def test_ledger_totals_follow_deposits_and_holds(plane: JobPlane) -> None:
    await plane.deposit(plane.consumer_tenant, 5, "more")
    text = await refreshed(plane)
    assert value(text, TOTAL, kind="deposit") == 105 * CREDIT
    for kind in ("charge", "fee", "payout", "hold", "release", "refund", "payout_reversal"):
        assert value(text, TOTAL, kind=kind) == 0, kind
    assert value(text, "gpuplane_ledger_balance_micro_credits", kind="available") == 105 * CREDIT
    assert value(text, "gpuplane_ledger_balance_micro_credits", kind="external") == -105 * CREDIT
    assert value(text, "gpuplane_ledger_imbalance_micro_credits") == 0
    assert value(text, "gpuplane_ledger_holds_outstanding") == 0

    # A queued job holds its budget; cancelled, the hold is released whole.
    job = await plane.submit(gpu_count=1)
    text = await refreshed(plane)
    assert value(text, "gpuplane_ledger_holds_outstanding") == 1
    held = value(text, "gpuplane_ledger_holds_outstanding_micro_credits")
    assert held is not None
    assert held > 0
    assert value(text, TOTAL, kind="hold") == held
    assert value(text, "gpuplane_ledger_balance_micro_credits", kind="held") == held
    assert value(text, "gpuplane_ledger_imbalance_micro_credits") == 0

    await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_CANCELLED])
    text = await refreshed(plane)
    assert value(text, "gpuplane_ledger_holds_outstanding") == 0
    assert value(text, "gpuplane_ledger_holds_outstanding_micro_credits") == 0
    assert value(text, TOTAL, kind="release") == held
    assert value(text, "gpuplane_ledger_balance_micro_credits", kind="held") == 0
    assert value(text, "gpuplane_ledger_balance_micro_credits", kind="available") == 105 * CREDIT


async def test_unary_rpcs_and_streams_have_separate_histograms(plane: JobPlane) -> None:
    job = await plane.submit(gpu_count=1)
    follow = plane.jobs.WatchJob(
        jobs_pb2.WatchJobRequest(job_id=job.job_id),
        metadata=plane.auth(plane.consumer_key),
    )
    await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    async for _ in follow:
        pass  # the stream ends with the job
    text = await refreshed(plane)
    submit = {"grpc_service": "gpuplane.v1.JobService", "grpc_method": "SubmitJob"}
    assert value(text, "grpc_server_handling_seconds_count", **submit, grpc_type="unary") == 1
    assert value(text, "gpuplane_rpc_stream_duration_seconds_count", **submit) is None
    events = {"grpc_service": "gpuplane.v1.JobService", "grpc_method": "WatchJob"}
    assert value(text, "grpc_server_handling_seconds_count", **events) is None
    streamed = value(
        text, "gpuplane_rpc_stream_duration_seconds_count", **events, grpc_type="server_stream"
    )
    assert streamed == 1
    assert value(text, "grpc_server_handled_total", **events, grpc_code="OK") == 1
