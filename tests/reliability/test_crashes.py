"""Crashes of whole processes: a control plane SIGKILLed between a placement's commit and its
JetStream publish, a daemon frozen (SIGSTOP) past the heartbeat timeout while its job runs and
then thawed, and NATS SIGKILLed while jobs are being submitted. Each uses its own nats-server
(restarted on the same store directory and port), so the session one is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import docker
import grpc
import nats
import pytest
from gpuplane.v1 import jobs_pb2, ledger_pb2, messaging_pb2, types_pb2
from nats.js.client import JetStreamContext
from sqlalchemy import select

from controlplane.db.engine import Database
from controlplane.jobs.models import JobAttempt
from controlplane.outbox.models import OutboxMessage
from daemon.runtime import LABEL_JOB
from devstack import DockerEngine, NatsServer, S3Server
from devstack.docker_engine import remove_containers
from messaging.subjects import DISPATCH_STREAM, dispatch_msg_id
from storage import layout
from tests.controlplane.scheduler.planes import fleet, plane_options, until
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import CREDIT, JobPlane, job_plane
from tests.reliability import summary
from tests.serving import serve

S = types_pb2
K = messaging_pb2


class PinnedNats(NatsServer):
    """A NatsServer that comes back on the same ports after a stop or a kill, so clients'
    own reconnect logic finds it again (the store directory is kept too)."""

    def _start(self) -> None:
        if not self.port:
            super()._start()
            return
        ports = (self.port, self.monitor_port)
        with mock.patch("devstack.nats.free_ports", lambda n: ports[:n]):
            super()._start()

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye to clients; then the bookkeeping of stop()."""
        process = self._process
        assert process is not None
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        self.stop()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PinnedNats]:
    yield from serve(PinnedNats(tmp_path / "nats"))


async def dispatch_ids(nats_url: str) -> tuple[int, Counter[str]]:
    """DISPATCH's last sequence (every message it ever stored: this NATS is the test's own)
    and the Nats-Msg-Id of each message still in it, counted."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(DISPATCH_STREAM)
        ids: Counter[str] = Counter()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            try:
                message = await js.get_msg(DISPATCH_STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue  # taken and acked (work queue)
            ids[(message.headers or {}).get("Nats-Msg-Id", "")] += 1
        return info.state.last_seq, ids
    finally:
        await nc.close()


async def outbox_rows(db: Database, msg_ids: set[str]) -> list[OutboxMessage]:
    async with db.read() as session:
        rows = (await session.scalars(select(OutboxMessage))).all()
    return [r for r in rows if r.msg_id in msg_ids]


async def attempts_of(db: Database, job_id: str) -> list[JobAttempt]:
    async with db.read() as session:
        return list(
            (await session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id))).all()
        )


async def run_to_success(host: ScriptedHost, dispatch: messaging_pb2.DispatchMessage) -> None:
    await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await host.report(dispatch, K.JOB_REPORT_KIND_UPLOADING, exit_code=0, run_time_ms=60_000)
    await host.report(
        dispatch,
        K.JOB_REPORT_KIND_FINISHED,
        exit_code=0,
        run_time_ms=60_000,
        manifest=[S.ResultObject(key="k", path="logs/stdout", size_bytes=1, sha256="00")],
    )


async def hang_up(host: ScriptedHost) -> None:
    """Closes the scripted daemon's Connect stream and NATS connection; a stream its control
    plane already ended may raise InvalidStateError from a task that was writing to it."""
    with contextlib.suppress(asyncio.InvalidStateError):
        await host.stop_heartbeats()
    await host._nc.close()


async def reconnect(host: ScriptedHost, channel: grpc.aio.Channel, nats_url: str) -> None:
    """The scripted daemon's answer to losing its control plane: connect to the new one."""
    await hang_up(host)
    host.channel = channel
    host.nats_url = nats_url
    await host.start()


async def settlement(plane: JobPlane, job: types_pb2.Job) -> tuple[dict[int, int], int]:
    """From the consumer's held-account entries for `job`: what each attempt was charged
    (usage is metered, so an attempt may have several CHARGE entries) and how many times the
    hold was released (settled: must be once). Also checks that what left the hold (charges
    and fees less refunds) is what the job was charged."""
    reply = await plane.ledger.ListEntries(
        ledger_pb2.ListEntriesRequest(tenant_id=plane.consumer_tenant, job_id=job.job_id),
        metadata=plane.auth(),
    )
    held = [e for e in reply.entries if e.account_kind == S.ACCOUNT_KIND_HELD]
    kinds = (S.TRANSFER_KIND_CHARGE, S.TRANSFER_KIND_FEE, S.TRANSFER_KIND_REFUND)
    spent = -sum(e.amount_micro_credits for e in held if e.kind in kinds)
    assert spent == job.charged_micro_credits
    # One held-account line per release transfer (its held → available move).
    releases = sum(1 for e in held if e.kind == S.TRANSFER_KIND_RELEASE)
    return dict(await charges_by_attempt(plane, job.job_id)), releases


async def charges_by_attempt(
    plane: JobPlane, job_id: str, kinds: tuple[int, ...] = (S.TRANSFER_KIND_CHARGE,)
) -> Counter[int]:
    """What left the consumer's held account for `job_id`, by attempt, in transfers of `kinds`
    (refunds count negative)."""
    reply = await plane.ledger.ListEntries(
        ledger_pb2.ListEntriesRequest(tenant_id=plane.consumer_tenant, job_id=job_id),
        metadata=plane.auth(),
    )
    moved: Counter[int] = Counter()
    for entry in reply.entries:
        if entry.account_kind == S.ACCOUNT_KIND_HELD and entry.kind in kinds:
            moved[entry.attempt] -= entry.amount_micro_credits
    return moved


# --- 1. control plane killed between the placement's commit and its publish ---------------


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_control_plane_killed_between_placement_commit_and_publish(
    tmp_path: Path,
    pg_url: str,
    private_nats: PinnedNats,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long heartbeat timeout: the host must outlive the control plane's restart, so the
    # only thing under test is the outbox (not host loss and retry).
    options = plane_options(pg_url, private_nats, s3_server, heartbeat_timeout_ms=30_000)
    channels: list[grpc.aio.Channel] = []
    host: ScriptedHost | None = None
    async with fleet(tmp_path, options, monkeypatch) as planes:
        try:
            setup = await planes.start("setup")  # tenants, credit and the streams
            await planes.stop(setup)
            doomed = planes.spawn("doomed")
            await doomed.wait_leading(planes.db)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{doomed.port}"))
            api = dataclasses.replace(setup.api, channel=channels[-1])
            token = await api.token()
            host = ScriptedHost(api.channel, private_nats.url, token, gpus=2)
            await host.start()

            private_nats.stop()  # nothing can be published from here on
            job = await api.submit(gpu_count=1)
            await api.wait_for(job.job_id, [S.JOB_STATE_SCHEDULED], timeout=15)
            msg_id = dispatch_msg_id(job.job_id, 1)
            rows = await outbox_rows(planes.db, {msg_id})
            assert [r.published_at for r in rows] == [None]  # committed, not published
            doomed.process.send_signal(signal.SIGKILL)
            doomed.process.wait(10)
            print(f"killed control plane {doomed.pid} with {msg_id} committed, unpublished")

            await asyncio.to_thread(private_nats.start)  # same store dir, same port
            fresh = planes.spawn("fresh")
            await fresh.wait_leading(planes.db)
            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{fresh.port}"))
            api = dataclasses.replace(api, channel=channels[-1])
            await reconnect(host, api.channel, private_nats.url)

            started = time.monotonic()
            # A lease the killed relay took lasts 10 s (DEFAULT_LEASE) before another relay
            # may publish the row.
            dispatch = await host.next_dispatch(timeout=30)
            took = time.monotonic() - started
            assert (dispatch.job_id, dispatch.attempt) == (job.job_id, 1)
            with pytest.raises(nats.errors.TimeoutError):
                await host.next_dispatch(timeout=1.0)  # and nothing more
            await run_to_success(host, dispatch)
            done = await api.wait_for(
                job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], timeout=20
            )
            assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
            assert done.attempt == 1
            attempts = await attempts_of(planes.db, job.job_id)
            assert [a.attempt for a in attempts] == [1]
            last_seq, _ = await dispatch_ids(private_nats.url)
            assert last_seq == 1  # exactly one message ever stored in DISPATCH
            rows = await outbox_rows(planes.db, {msg_id})
            assert len(rows) == 1
            assert rows[0].published_at is not None
            charged, releases = await settlement(api, done)
            assert list(charged) == [1]
            assert releases == 1
            await api.assert_ledger_consistent()
            balance = await api.balance(api.consumer_tenant)
            assert balance.available_micro_credits + balance.held_micro_credits == (
                100 * CREDIT - done.charged_micro_credits
            )
        finally:
            if host is not None:
                await hang_up(host)
            for channel in channels:
                await channel.close(None)
    print(f"dispatch published by the new control plane {took:.2f}s after it led")
    summary.record(
        "kill -9 control plane between placement commit and publish",
        f"NATS down, placement committed, plane killed, restarted: published once "
        f"{took:.1f}s after the new plane led, 1 attempt, charged once",
        faults_injected=2,
        jobs_run=1,
        lost_jobs=0 if done.state == S.JOB_STATE_SUCCEEDED else 1,
        double_settlements=max(0, releases - 1),
    )


# --- 6. NATS killed under load and restarted ------------------------------------------------


@dataclasses.dataclass
class Publishes:
    """Every JetStream publish of this process: msg id → outcomes ("ok", "dup", "error")."""

    outcomes: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def wrap(self, publish: Any) -> Any:
        async def wrapped(js: JetStreamContext, subject: str, payload: bytes, **kw: Any) -> Any:
            msg_id = (kw.get("headers") or {}).get("Nats-Msg-Id", "")
            seen = self.outcomes.setdefault(msg_id, [])
            try:
                ack = await publish(js, subject, payload, **kw)
            except BaseException:
                seen.append("error")
                raise
            seen.append("dup" if ack.duplicate else "ok")
            return ack

        return wrapped


@pytest.mark.postgres
@pytest.mark.timeout(90)
async def test_nats_killed_under_load_loses_no_acknowledged_job(
    tmp_path: Path,
    pg_url: str,
    private_nats: PinnedNats,
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publishes = Publishes()
    monkeypatch.setattr(JetStreamContext, "publish", publishes.wrap(JetStreamContext.publish))
    # Longer than nats-py's JetStream publish timeout (5 s): publishes in flight when NATS
    # died fail, their rows go back to the outbox and are published again after the restart.
    cap, kill_after, outage_s = 64, 10, 6.0
    accepted: list[str] = []
    refused: Counter[str] = Counter()
    async with job_plane(tmp_path / "cp", private_nats.url, s3_server, pg_url) as plane:
        token = await plane.token()
        # Enough GPUs for every job; it never takes its dispatch, so DISPATCH keeps them all.
        host = ScriptedHost(plane.channel, private_nats.url, token, gpus=cap)
        await host.start()
        try:
            down = asyncio.Event()
            stop = asyncio.Event()
            during: list[str] = []

            async def submitter() -> None:
                while not stop.is_set() and len(accepted) + refused.total() < cap:
                    try:
                        job = await plane.submit(gpu_count=1)
                    except grpc.aio.AioRpcError as error:
                        refused[error.code().name] += 1
                    else:
                        accepted.append(job.job_id)
                        if down.is_set():
                            during.append(job.job_id)
                    await asyncio.sleep(0.2)

            async def fault() -> None:
                await until(lambda: len(accepted) >= kill_after, 30, "jobs accepted")
                private_nats.kill()
                down.set()
                await asyncio.sleep(outage_s)
                await asyncio.to_thread(private_nats.start)
                down.clear()
                back = len(accepted)
                await until(lambda: len(accepted) >= min(back + kill_after, cap), 30, "more")
                stop.set()

            await asyncio.gather(submitter(), fault())
            assert set(refused) <= {"UNAVAILABLE"}, refused
            assert during, "no job was submitted while NATS was down"

            wanted = {dispatch_msg_id(job_id, 1) for job_id in accepted}

            async def all_dispatched() -> bool:
                last_seq, ids = await dispatch_ids(private_nats.url)
                return last_seq >= len(wanted) and set(ids) >= wanted

            waited = await until(all_dispatched, 40, "every accepted job dispatched")
            last_seq, ids = await dispatch_ids(private_nats.url)
            assert set(ids) == wanted
            assert all(n == 1 for n in ids.values()), [i for i, n in ids.items() if n > 1]
            assert last_seq == len(wanted)  # nothing stored twice, nothing else stored
            for job_id in accepted:
                job = await plane.get(job_id)
                assert job.state == S.JOB_STATE_SCHEDULED, (job_id, job.state)
                assert job.attempt == 1
            assert plane.plane.db is not None
            rows = await outbox_rows(plane.plane.db, wanted)
            assert len(rows) == len(wanted)
            assert all(r.published_at is not None for r in rows)
            await plane.assert_ledger_consistent()
        finally:
            await hang_up(host)
    tries = Counter(o for outcomes in publishes.outcomes.values() for o in outcomes)
    retried = sum(1 for m in wanted if len(publishes.outcomes.get(m, [])) > 1)
    print(
        f"{len(accepted)} accepted ({len(during)} while NATS was down), refused {dict(refused)}; "
        f"publish outcomes {dict(tries)}, {retried} dispatches published more than once "
        f"by the relay; all in DISPATCH once, {waited:.1f}s after the last submit"
    )
    summary.record(
        "kill -9 NATS under submit load, restarted",
        f"{len(accepted)} jobs accepted ({len(during)} during a {outage_s:.0f}s outage), "
        f"{sum(refused.values())} refused UNAVAILABLE, {tries['error']} failed publishes, "
        f"{tries['dup']} dropped as duplicates: each dispatch stored once",
        faults_injected=1,
        requests_tried=len(accepted) + sum(refused.values()),
        jobs_run=len(accepted),
        lost_jobs=len(wanted - set(ids)),
    )


# --- 3. a daemon frozen past the heartbeat timeout, then thawed ----------------------------


def start_daemon(
    plane: JobPlane, token: str, data_dir: Path, s3: S3Server, engine: DockerEngine
) -> subprocess.Popen[bytes]:
    """`gpuplane daemon run` with one simulated GPU, heartbeats every 200 ms and usage
    reports every 500 ms (so a thawed daemon reports usage of its stale attempt)."""
    gpuplane = Path(sys.executable).parent / "gpuplane"
    env = dict(
        os.environ,
        GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS="200",
        GPUPLANE_DAEMON_USAGE_REPORT_INTERVAL_SECONDS="0.5",
    )
    log = (data_dir.parent / f"{data_dir.name}.log").open("ab")
    argv = [str(gpuplane), "daemon", "run", "--plaintext", "--control-plane", plane.address]
    argv += ["--token", token]
    argv += ["--data-dir", str(data_dir), "--simulate-gpus", "1xA100-80GB"]
    argv += ["--gpu-device-requests", "always", "--docker-host", engine.base_url]
    argv += ["--price-per-gpu-hour", "2"]
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
async def fenced_plane(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    def configure(options: dict[str, Any]) -> None:
        options["heartbeat_timeout_ms"] = 1500

    async with job_plane(tmp_path / "cp", nats_server.url, s3_server, configure=configure) as p:
        yield p


@pytest.mark.docker
@pytest.mark.timeout(90)
async def test_frozen_daemon_is_replaced_and_its_late_reports_are_fenced(
    fenced_plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plane = fenced_plane
    assert plane.plane.background is not None
    jobs = plane.plane.background.jobs
    reports: list[tuple[float, int, int, bool]] = []  # (time, attempt, kind, applied)
    apply_report = jobs.apply_report

    async def recording(report: messaging_pb2.JobReport, subject_host: str | None = None) -> bool:
        applied = await apply_report(report, subject_host)
        reports.append((time.monotonic(), report.attempt, report.kind, applied))
        return applied

    monkeypatch.setattr(jobs, "apply_report", recording)
    daemons: list[subprocess.Popen[bytes]] = []
    job_id = ""
    try:
        token = await plane.token()
        daemons.append(start_daemon(plane, token, tmp_path / "frozen", s3_server, docker_engine))
        job = await plane.submit(
            image=test_image,
            command=["sh", "-c", "sleep 6; echo done > /output/result.txt"],
            gpu_count=1,
            max_retries=2,
        )
        job_id = job.job_id
        running = await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING], timeout=40)
        frozen_host = running.host_id
        # The second host comes up only now, so attempt 1 ran on the frozen one.
        token = await plane.token()
        daemons.append(start_daemon(plane, token, tmp_path / "spare", s3_server, docker_engine))

        os.kill(daemons[0].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()

        async def replaced() -> bool:
            current = await plane.get(job.job_id)
            return current.attempt == 2 and current.state == S.JOB_STATE_RUNNING

        await until(replaced, 40, "attempt 2 runs")
        # Thawed while attempt 1's container (not frozen: Docker runs it) still runs, so the
        # daemon reports its usage, then UPLOADING, FINISHED and results, all for attempt 1.
        await asyncio.sleep(max(0.0, 3.5 - (time.monotonic() - frozen_at)))
        frozen_for = time.monotonic() - frozen_at
        # Attempt 1 may have been metered before the freeze (usage every 0.5 s): those
        # charges are refunded with the lost attempt; nothing may be added after the thaw.
        before_thaw = await charges_by_attempt(plane, job.job_id)
        os.kill(daemons[0].pid, signal.SIGCONT)
        thawed_at = time.monotonic()

        done = await plane.wait_for(
            job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED], timeout=40
        )
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
        assert done.attempt == 2
        assert done.host_id != frozen_host
        # The thawed daemon's reports of attempt 1: wait a moment for them to come in.
        await until(
            lambda: any(t > thawed_at and a == 1 for t, a, _, _ in reports),
            20,
            "the thawed daemon reports attempt 1",
        )
        await asyncio.sleep(2.0)
        late = [(kind, applied) for t, a, kind, applied in reports if a == 1 and t > thawed_at]
        assert late
        assert not any(applied for _, applied in late), late
        after = await plane.get(job.job_id)
        assert (after.state, after.attempt) == (S.JOB_STATE_SUCCEEDED, 2)
        assert after.charged_micro_credits == done.charged_micro_credits
        attempts = {a.attempt: a for a in after.attempts}
        print({n: (a.reason, a.charged_micro_credits) for n, a in attempts.items()})
        assert attempts[1].charged_micro_credits == 0  # lost: the provider's fault
        assert attempts[2].charged_micro_credits == after.charged_micro_credits > 0
        charged, releases = await settlement(plane, after)
        assert charged.get(1, 0) == before_thaw[1]  # nothing for the stale attempt's late usage
        assert charged[2] > 0
        spent = (S.TRANSFER_KIND_CHARGE, S.TRANSFER_KIND_FEE, S.TRANSFER_KIND_REFUND)
        assert (await charges_by_attempt(plane, job.job_id, spent))[1] == 0  # all refunded
        assert releases == 1
        results = await plane.jobs.GetResults(
            jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
        )
        assert results.objects
        assert all(r.key.startswith(layout.attempt_prefix(job.job_id, 2)) for r in results.objects)
        await plane.assert_ledger_consistent()
        balance = await plane.balance(plane.consumer_tenant)
        assert balance.available_micro_credits + balance.held_micro_credits == (
            100 * CREDIT - after.charged_micro_credits
        )
    finally:
        for daemon in daemons:
            if daemon.poll() is None:
                os.kill(daemon.pid, signal.SIGCONT)
                daemon.kill()
                daemon.wait()
        remove_containers(docker_client, f"{LABEL_JOB}={job_id}")
    kinds = Counter(K.JobReportKind.Name(kind) for kind, _ in late)  # type: ignore[arg-type]
    print(f"frozen {frozen_for:.1f}s; late attempt-1 reports, all rejected: {dict(kinds)}")
    summary.record(
        "SIGSTOP daemon past heartbeat timeout, then SIGCONT",
        f"frozen {frozen_for:.1f}s, re-run as attempt 2 on another host, {len(late)} late "
        "attempt-1 reports rejected, charged attempt 2 only",
        faults_injected=1,
        jobs_run=1,
        double_settlements=max(0, releases - 1),
    )
