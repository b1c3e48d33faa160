"""One batch of terminal reports mixing plain endings (applied on rows read detached and
written back set-based) with a lost attempt, a duplicate, an unknown attempt and a failure:
each report gets its own answer, and every row a plain ending writes is as the loaded path
would leave it (job, attempt, history, host, hold)."""

from __future__ import annotations

import pytest
from gpuplane.v1 import messaging_pb2, types_pb2
from sqlalchemy import select

from controlplane.jobs.models import JobAttempt, JobEvent
from controlplane.jobs.reports import Incoming
from controlplane.jobs.repository_endings import EndingRows
from controlplane.registry.models import Gpu, Host
from devstack.factories import new_gpus, new_online_host
from tests.controlplane.jobs.test_report_batches import PRICE, _finished, _jobs, _running
from tests.harness import JobPlane

K = messaging_pb2
pytestmark = [
    pytest.mark.databases("sqlite", "postgresql"),
    pytest.mark.plane(heartbeat_timeout_ms=600_000),
    pytest.mark.timeout(120),
]


def _reports(jobs: list[str], host_id: str) -> list[K.JobReport]:
    plain = _finished(jobs[0], host_id, 1500)
    plain.manifest.add(key="out/a.txt", path="a.txt", size_bytes=3, sha256="ab" * 32)
    lost = K.JobReport(
        job_id=jobs[2],
        attempt=1,
        host_id=host_id,
        seq=2,
        kind=K.JOB_REPORT_KIND_STOPPED,
        run_time_ms=900,
        stop_reason=K.STOP_REASON_HOST_ERROR,
        reason="the host's disk failed",
    )
    unknown = _finished(jobs[3], host_id, 100)
    unknown.attempt = 7
    failed = _finished(jobs[4], host_id, 800)
    failed.exit_code, failed.stop_reason = 3, K.STOP_REASON_EXITED_WITH_ERROR
    twice = _finished(jobs[1], host_id, 1200)
    return [plain, twice, twice, lost, unknown, failed]


async def test_a_mixed_batch_answers_each_report_and_writes_what_the_loaded_path_would(
    plane: JobPlane,
) -> None:
    token = await plane.token()
    host = await new_online_host(
        plane.channel, token, gpus=new_gpus(5), price_per_gpu_hour_micro_credits=PRICE
    )
    jobs = await _running(plane, host.host_id, 5)
    batch = [Incoming(r, host.host_id) for r in _reports(jobs, host.host_id)]
    answers = await _jobs(plane)._apply_batch(batch)
    assert not any(isinstance(a, Exception) for a in answers), answers
    assert [a is not None for a in answers] == [True, True, False, True, False, True]
    states = [(await plane.get(j)).state for j in jobs]
    assert states == [
        types_pb2.JOB_STATE_SUCCEEDED,
        types_pb2.JOB_STATE_SUCCEEDED,
        types_pb2.JOB_STATE_QUEUED,  # lost to its host: retried, never charged
        types_pb2.JOB_STATE_RUNNING,  # the report named an attempt it never had
        types_pb2.JOB_STATE_FAILED,
    ]
    charged = [(await plane.get(j)).charged_micro_credits for j in jobs]
    assert charged == [1500, 1200, 0, 0, 800]
    assert plane.plane.db is not None
    async with plane.plane.db.read() as session:
        attempt = await session.get(JobAttempt, (jobs[0], 1))
        failed = await session.get(JobAttempt, (jobs[4], 1))
        events = (
            await session.scalars(
                select(JobEvent).where(JobEvent.job_id == jobs[0]).order_by(JobEvent.seq)
            )
        ).all()
        completed = await session.scalar(
            select(Host.completed_attempts).where(Host.id == host.host_id)
        )
        held = set(
            await session.scalars(
                select(Gpu.job_id).where(Gpu.host_id == host.host_id, Gpu.job_id.in_(jobs))
            )
        )
    assert attempt is not None
    assert failed is not None
    assert (attempt.state, attempt.live, attempt.lost) == ("succeeded", False, False)
    assert (attempt.report_seq, attempt.run_time_ms, attempt.exit_code) == (2, 1500, 0)
    assert attempt.charged == 1500
    assert attempt.finished_at is not None
    assert attempt.manifest == [
        {"key": "out/a.txt", "path": "a.txt", "size_bytes": 3, "sha256": "ab" * 32}
    ]
    assert (failed.state, failed.exit_code, failed.charged) == ("failed", 3, 800)
    # The history numbered on from the job's earlier events, the ending last.
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert (events[-1].state, events[-1].attempt, events[-1].exit_code) == ("succeeded", 1, 0)
    assert completed == 3  # the three attempts that ended; the lost one is retried
    # The ended attempts freed their GPUs: only the job still running holds one (and the
    # retried job, should the scheduler have placed its next attempt here already).
    assert held - {jobs[2]} == {jobs[3]}
    await plane.assert_ledger_consistent()
    # Replayed as a batch, nothing changes.
    again = await _jobs(plane)._apply_batch(batch)
    assert [a is not None for a in again] == [False, False, False, False, False, False]
    assert [(await plane.get(j)).charged_micro_credits for j in jobs] == charged


async def test_detached_rows_write_bytes_and_json_back_exactly(plane: JobPlane) -> None:
    """What a plain ending writes round-trips whatever it holds (bytes of every value, JSON
    with quotes and backslashes), and a change to a column an ending may not write is refused
    rather than lost."""
    token = await plane.token()
    host = await new_online_host(
        plane.channel, token, gpus=new_gpus(1), price_per_gpu_hour_micro_credits=PRICE
    )
    (job_id,) = await _running(plane, host.host_id, 1)
    signature = bytes(range(256))
    manifest = [{"key": 'a"b\\c', "path": "x\ty", "size_bytes": 2**40, "sha256": "é"}]
    db = plane.plane.db
    assert db is not None
    async with db.transaction() as session:
        rows = EndingRows(session)
        (pair,) = (await rows.lock_ending({(job_id, 1)})).values()
        _, attempt = pair
        attempt.host_provenance = b'{"q":"\\"","nul":"\\u0000"}'
        attempt.host_provenance_signature = signature
        attempt.manifest = manifest
        await rows.write_ended([pair])
    async with db.read() as session:
        stored = await session.get(JobAttempt, (job_id, 1))
    assert stored is not None
    assert stored.host_provenance == b'{"q":"\\"","nul":"\\u0000"}'
    assert stored.host_provenance_signature == signature
    assert stored.manifest == manifest
    async with db.transaction() as session:
        rows = EndingRows(session)
        (pair,) = (await rows.lock_ending({(job_id, 1)})).values()
        pair[1].gpu_utilization_sum = 7  # not a column an ending writes
        with pytest.raises(AssertionError, match="gpu_utilization_sum"):
            await rows.write_ended([pair])
