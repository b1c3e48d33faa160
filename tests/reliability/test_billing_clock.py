"""Hostile providers against billing: a real daemon runs real jobs (Docker) on NATS in operator
mode, and its provider forges reports with the host's own NATS credentials (from host.json) on
the host's own events subject. Forged run time is capped at what the control plane observed;
a poisoned seq neither fences the daemon's reports out nor stalls the job; a report for an
attempt the daemon does not run gets that attempt lost at once, not charged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import messaging_pb2, registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.jobs.clock import MAX_SEQ_JUMP
from controlplane.jobs.repository import JobRepository
from controlplane.ledger.service import charge_for
from daemon.agent import Agent
from daemon.bus import DaemonBus
from daemon.identity import HostIdentity
from devstack import DockerEngine, NatsServer, S3Server
from messaging.natsjwt import NatsKeys
from messaging.signing import SigningKey
from tests.e2e.test_job_path import PRICE
from tests.e2e.test_job_path import settings as daemon_settings
from tests.e2e.test_nats_auth import auth_nats, nats_keys
from tests.harness import JobPlane, job_plane
from tests.reliability import summary
from tests.reliability.test_crashes import settlement

S = types_pb2
K = messaging_pb2
SLACK_MS = 5000
# A hold of 0.1 credit at the daemon's 2 credits per GPU-hour: 180 s of one GPU.
MAX_DURATION = 180
__all__ = ["auth_nats", "nats_keys"]  # module fixtures, shared with test_nats_auth.py
pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


@pytest.fixture
async def plane(
    tmp_path: Path, auth_nats: NatsServer, s3_server: S3Server, nats_keys: NatsKeys
) -> AsyncIterator[JobPlane]:
    """A plane on NATS in operator mode with the production clock bound (5 s of slack) and
    running lists compared with live attempts every 0.3 s."""

    def configure(options: dict[str, Any]) -> None:
        options["nats_operator_seed"] = nats_keys.operator_seed
        options["nats_account_seed"] = nats_keys.account_seed
        options["nats_system_account_seed"] = nats_keys.system_account_seed
        options["run_time_slack_ms"] = SLACK_MS
        options["reconcile_interval_ms"] = 300

    async with job_plane(tmp_path / "cp", auth_nats.url, s3_server, configure=configure) as p:
        yield p


async def start_agent(
    plane: JobPlane, data_dir: Path, s3: S3Server, engine: DockerEngine, **changes: Any
) -> Agent:
    settings = daemon_settings(plane, await plane.token(), data_dir, s3, engine, "2xA100-80GB")
    agent = Agent(settings.model_copy(update={"usage_report_interval_seconds": 1.0, **changes}))
    await agent.start()
    return agent


async def forger(agent: Agent) -> DaemonBus:
    """The provider's own NATS connection, with the credentials its daemon keeps, signing with
    its host's own key (the provider holds it: what it forges is signed as its daemon's
    reports are, so the control plane's clock is what must catch it)."""
    identity = HostIdentity.load(agent.settings.host_file)
    assert identity is not None
    assert identity.nats_credentials
    bus = await DaemonBus.connect(
        identity.nats_servers, identity.nats_credentials, identity.nats_inbox_prefix
    )
    bus.signer = SigningKey.load_or_create(agent.settings.signing_key_file)
    return bus


def forged(agent: Agent, job: S.Job, kind: int, seq: int, **fields: Any) -> K.JobReport:
    return K.JobReport(
        job_id=job.job_id,
        attempt=1,
        host_id=agent.host_id,
        seq=seq,
        kind=kind,  # type: ignore[arg-type]
        **fields,
    )


def last_seq(agent: Agent, job: S.Job) -> int:
    entry = agent.journal.get(job.job_id, 1)
    assert entry is not None
    return entry.last_seq


async def job_events(plane: JobPlane, job_id: str) -> list[tuple[str, Any]]:
    """(reason, time) of the job's recorded events."""
    db = plane.plane.db
    assert db is not None
    async with db.read() as session:
        return [(e.reason, e.time) for e in await JobRepository(session).events_after(job_id, 0)]


async def until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.1)


def millis(later: Any, earlier: Any) -> int:
    return int((later.ToDatetime() - earlier.ToDatetime()).total_seconds() * 1000)


async def reliability(plane: JobPlane, host_id: str) -> int:
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    reply = await registry.GetHost(
        registry_pb2.GetHostRequest(host_id=host_id), metadata=plane.auth()
    )
    return int(reply.host.reliability_permille)


def metric(plane: JobPlane, name: str, **labels: str) -> float:
    return plane.plane.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_forged_run_time_is_capped_at_what_the_control_plane_observed(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> None:
    agent = await start_agent(plane, tmp_path / "d", s3_server, docker_engine)
    bus = await forger(agent)
    try:
        job = await plane.submit(
            image=test_image,
            command=["sh", "-c", "sleep 8"],
            gpu_count=1,
            max_duration_seconds=MAX_DURATION,
        )
        assert job.hold_micro_credits == charge_for(PRICE, 1, MAX_DURATION * 1000)
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        await asyncio.sleep(2)
        # 180 s of run time claimed 2 s in: the whole hold, if it were believed.
        claim = forged(
            agent, job, K.JOB_REPORT_KIND_USAGE, last_seq(agent, job) + 5, run_time_ms=180_000
        )
        await bus.publish_report(claim)

        async def capped() -> tuple[str, Any] | None:
            return next((e for e in await job_events(plane, job.job_id) if "capped" in e[0]), None)

        reason, noted_at = await until(capped, 10, "the capped report's event")
        assert "180000 ms" in reason, reason
        assert metric(plane, "gpuplane_job_reports_capped_total") >= 1
        running = await plane.get(job.job_id)
        started = running.attempts[0].started_at.ToDatetime().replace(tzinfo=noted_at.tzinfo)
        observed_ms = int((noted_at - started).total_seconds() * 1000)
        assert observed_ms < 8000
        # Charged (metered) at most the observed time plus the slack, far from the hold.
        assert running.charged_micro_credits <= charge_for(PRICE, 1, observed_ms + SLACK_MS)
        assert running.charged_micro_credits < job.hold_micro_credits // 4

        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED], timeout=40)
        attempt = done.attempts[0]
        window_ms = millis(attempt.finished_at, attempt.started_at)
        assert done.usage.run_time_ms <= window_ms + SLACK_MS
        assert 7000 <= done.usage.run_time_ms < 20_000
        assert done.charged_micro_credits == charge_for(PRICE, 1, done.usage.run_time_ms)
        charges, releases = await settlement(plane, done)
        assert releases == 1
        assert set(charges) == {1}  # settlement() checked the total against the job's
        # One bad outcome for the forgery (once per attempt) beside the good one for the run:
        # (1 + 4.5) / (2 + 5) of the prior of 90 % worth 5 outcomes, not (1 + 4.5) / 6.
        assert 780 <= await reliability(plane, agent.host_id) <= 790
    finally:
        await bus.close()
        await agent.stop()
    await plane.assert_ledger_consistent()
    summary.record(
        "forged run time",
        "180 s of run time claimed 2 s into a job: capped at the observed time + 5 s, "
        "event recorded, charged the real run time",
        faults_injected=1,
        jobs_run=1,
    )


async def test_a_poisoned_seq_neither_fences_out_nor_stalls_the_job(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> None:
    agent = await start_agent(plane, tmp_path / "d", s3_server, docker_engine)
    bus = await forger(agent)
    consumer = plane.plane.background.report_consumer  # type: ignore[union-attr]
    try:
        job = await plane.submit(
            image=test_image, command=["sh", "-c", "sleep 4; echo done"], gpu_count=1
        )
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        # Far ahead: refused, recording nothing.
        await bus.publish_report(forged(agent, job, K.JOB_REPORT_KIND_USAGE, 1 << 40))
        assert consumer is not None

        async def refused() -> bool:
            return consumer.refused["seq_jump"] >= 1

        await until(refused, 10, "the implausible seq refused")
        assert metric(plane, "gpuplane_job_reports_dropped_total", reason="seq_jump") >= 1
        # Just within the bound: applied, so every later report of the daemon but its
        # terminal one is stale now. The terminal one still ends the job.
        ahead = last_seq(agent, job) + MAX_SEQ_JUMP
        await bus.publish_report(forged(agent, job, K.JOB_REPORT_KIND_USAGE, ahead))
        done = await plane.wait_for(
            job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], timeout=40
        )
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
        assert done.usage.run_time_ms >= 3500  # Docker's run time of `sleep 4`
        assert done.charged_micro_credits == charge_for(PRICE, 1, done.usage.run_time_ms)
        charges, releases = await settlement(plane, done)
        assert releases == 1, "settled once"
        assert set(charges) <= {1}
        # The daemon's own reports, all within the control plane's window + 5 s: none capped.
        assert metric(plane, "gpuplane_job_reports_capped_total") == 0
    finally:
        await bus.close()
        await agent.stop()
    await plane.assert_ledger_consistent()
    summary.record(
        "poisoned seq",
        f"a report with seq 2^40 (refused) and one {MAX_SEQ_JUMP} ahead: the daemon's "
        "final report still ends the job, settled once",
        faults_injected=2,
        jobs_run=1,
    )


async def test_a_report_for_an_attempt_the_daemon_does_not_run_loses_it_at_once(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> None:
    # Two GPUs, but the daemon takes one job at a time: the second job's dispatch waits.
    agent = await start_agent(
        plane, tmp_path / "d", s3_server, docker_engine, max_concurrent_jobs=1
    )
    bus = await forger(agent)
    try:
        first = await plane.submit(image=test_image, command=["sleep", "15"], gpu_count=1)
        await plane.wait_for(first.job_id, [S.JOB_STATE_RUNNING])
        second = await plane.submit(
            image=test_image, command=["sh", "-c", "echo second"], gpu_count=1
        )
        placed = await plane.wait_for(second.job_id, [S.JOB_STATE_SCHEDULED])
        assert placed.host_id == agent.host_id
        assert (second.job_id, 1) not in agent.executors
        # The provider bills the waiting job as if it ran.
        await bus.publish_report(forged(agent, second, K.JOB_REPORT_KIND_RUNNING, 2))
        await bus.publish_report(
            forged(agent, second, K.JOB_REPORT_KIND_USAGE, 3, run_time_ms=3000)
        )
        forged_at = time.monotonic()

        async def lost() -> S.Job | None:
            job = await plane.get(second.job_id)
            attempts = [a for a in job.attempts if a.attempt == 1]
            if attempts and attempts[0].attempt_state == S.ATTEMPT_STATE_LOST:
                return job
            return None

        job = await until(lost, 10, "the attempt its daemon does not run lost")
        took = time.monotonic() - forged_at
        assert (await plane.get(first.job_id)).state == S.JOB_STATE_RUNNING, "at once"
        attempt = job.attempts[0]
        assert "not running here" in attempt.reason, attempt.reason
        assert attempt.charged_micro_credits == 0
        assert metric(plane, "gpuplane_host_resyncs_total") >= 1
        # Requeued: attempt 2 runs once the daemon is free; attempt 1's late dispatch is not.
        done = await plane.wait_for(
            second.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], timeout=60
        )
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
        assert done.attempt == 2
        charges, releases = await settlement(plane, done)
        assert releases == 1
        assert set(charges) <= {1, 2}
        # What metering charged attempt 1 on the forged run time went back into the hold.
        assert done.attempts[0].charged_micro_credits == 0
        assert done.charged_micro_credits == done.attempts[1].charged_micro_credits
        assert (await plane.wait_for(first.job_id, [S.JOB_STATE_SUCCEEDED])).attempt == 1
    finally:
        await bus.close()
        await agent.stop()
    await plane.assert_ledger_consistent()
    summary.record(
        "a report for a job the host does not run",
        f"RUNNING and run time forged for a job whose dispatch waits: lost in {took:.1f}s "
        "(resync answered not running here), not charged, run again as attempt 2",
        faults_injected=1,
        jobs_run=2,
    )
