"""The scale-out topology under faults: a 3-node NATS cluster (streams at R3), two control
planes on one PostgreSQL and three daemons, all separate processes, run 200 jobs while the
DISPATCH stream's leader node is killed (-9) and restarted and the scheduling leader's
control plane is killed (-9) for good. Every job ends SUCCEEDED once, charged once, and the
books balance."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import nats.errors
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    types_pb2,
)
from sqlalchemy import text

from controlplane.db.engine import Database
from daemon.target import grpc_target
from devstack import DockerEngine, NatsCluster, S3Server
from messaging.subjects import DISPATCH_STREAM, EVENTS_STREAM
from tests.controlplane.scripted_host import mint_token
from tests.e2e.test_control_plane_failover import serving
from tests.scheduler.planes import Fleet, PlaneProcess, fleet, plane_options, until
from tests.scheduler.probes import lease

pytestmark = [pytest.mark.timeout(420), pytest.mark.docker, pytest.mark.postgres]
S = types_pb2
CREDIT = 1_000_000
# Credits per GPU-hour: 10 micro-credits per GPU-millisecond, so even a job that runs for a
# few milliseconds is charged something (at 2 credits it could round to nothing).
PRICE = 36
DEPOSIT = 1000
JOBS = 200
DAEMONS = 3
GPUS = "4xA100-80GB"
# Submits are spread so that the faults land mid-run: one every SUBMIT_GAP seconds.
SUBMIT_GAP = 0.12
KILL_NATS_AT, RESTART_NATS_AT, KILL_PLANE_AT = 40, 90, 120  # after this many submits


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Client:
    """The consumer's and the admin's view, over a channel listing both control planes."""

    channel: grpc.aio.Channel
    admin_key: str
    consumer_key: str = ""
    consumer: str = ""
    provider: str = ""

    def auth(self, key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key}"),)

    async def tenant(self, name: str, role: types_pb2.Role.ValueType) -> tuple[str, str]:
        admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        made = await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name=name), metadata=self.auth(self.admin_key)
        )
        key = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=made.tenant.tenant_id, role=role),
            metadata=self.auth(self.admin_key),
        )
        return made.tenant.tenant_id, key.secret

    async def submit(self, index: int) -> str:
        """Submits job `index`; a call cut off by a dying plane is retried with the same
        idempotency key, so it yields one job whichever plane took the first try."""
        request = jobs_pb2.SubmitJobRequest(
            spec=types_pb2.JobSpec(
                image="gpuplane-test/busybox:1",
                command=["sh", "-c", f"sleep 0.1; echo {index} > /output/n.txt"],
                gpu_count=1,
                max_duration_seconds=60,
                max_price_per_gpu_hour_micro_credits=PRICE * CREDIT,
                max_retries=3,
            ),
            idempotency_key=f"topology-{index}",
        )
        stub = jobs_pb2_grpc.JobServiceStub(self.channel)
        for _ in range(40):
            try:
                reply = await stub.SubmitJob(
                    request, metadata=self.auth(self.consumer_key), timeout=10
                )
                return str(reply.job.job_id)
            except grpc.aio.AioRpcError as error:
                if error.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
            await asyncio.sleep(0.25)
        raise AssertionError(f"job {index} could not be submitted")

    async def jobs(self) -> list[types_pb2.Job]:
        """Every job of the consumer, with its attempts (GetJob: ListJobs leaves them out)."""
        stub = jobs_pb2_grpc.JobServiceStub(self.channel)
        ids: list[str] = []
        token = ""
        while True:
            page = await stub.ListJobs(
                jobs_pb2.ListJobsRequest(page_size=500, page_token=token),
                metadata=self.auth(self.consumer_key),
                timeout=10,
            )
            ids.extend(j.job_id for j in page.jobs)
            token = page.next_page_token
            if not token:
                break
        found = []
        for job_id in ids:
            reply = await stub.GetJob(
                jobs_pb2.GetJobRequest(job_id=job_id), metadata=self.auth(self.consumer_key)
            )
            found.append(reply.job)
        return found

    async def balance(self, tenant: str) -> types_pb2.Balance:
        reply = await ledger_pb2_grpc.LedgerServiceStub(self.channel).GetBalance(
            ledger_pb2.GetBalanceRequest(tenant_id=tenant), metadata=self.auth(self.admin_key)
        )
        return reply.balance


def spawn_daemon(
    directory: Path,
    planes: str,
    token: str,
    cluster: NatsCluster,
    s3: S3Server,
    engine: DockerEngine,
) -> subprocess.Popen[bytes]:
    """`gpuplane daemon run` with simulated GPUs, both plane addresses and all NATS URLs."""
    directory.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
    env["GPUPLANE_DAEMON_RECONNECT_BASE_SECONDS"] = "0.2"
    env["GPUPLANE_DAEMON_RECONNECT_MAX_SECONDS"] = "1.0"
    argv = [sys.executable, "-m", "gpuplane_cli.main", "daemon", "run"]
    argv += ["--control-plane", planes, "--token", token, "--data-dir", str(directory / "data")]
    argv += ["--simulate-gpus", GPUS, "--gpu-device-requests", "always"]
    argv += ["--docker-host", engine.base_url, "--nats-url", cluster.urls]
    argv += ["--s3-endpoint", s3.endpoint, "--s3-access-key", s3.access_key]
    argv += ["--s3-secret-key", s3.secret_key, "--price-per-gpu-hour", str(PRICE)]
    with (directory / "daemon.log").open("wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


async def stream_leaders(cluster: NatsCluster, timeout: float = 5.0) -> dict[str, str]:
    """Stream name → the server_name of its leader, as JetStream's stream info says (asked
    of the running nodes only, each request bounded by `timeout`)."""
    urls = [node.url for node in cluster.nodes if node.running]
    nc = await nats.connect(servers=urls, connect_timeout=2, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=timeout)
        leaders = {}
        for stream in (DISPATCH_STREAM, EVENTS_STREAM):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, info.config
            assert info.cluster is not None
            assert info.cluster.leader, info
            leaders[stream] = info.cluster.leader
        return leaders
    finally:
        await nc.close()


async def leading_process(db: Database, processes: list[PlaneProcess]) -> PlaneProcess:
    """The plane process named by the scheduler lease (holder `<host>/<pid>/...`)."""
    current = await lease(db)
    assert current is not None, "no scheduling leader"
    pid = current[1].split("/")[1]
    found = next((p for p in processes if str(p.pid) == pid), None)
    assert found is not None, f"the lease names {current[1]}, none of {processes}"
    return found


@dataclass
class Faults:
    """What the fault task did and how long each takeover took, with wall-clock times of
    the kills to relate to the jobs' timestamps."""

    done: list[str] = field(default_factory=list)
    at: dict[str, float] = field(default_factory=dict)
    took: dict[str, float] = field(default_factory=dict)


async def new_stream_leader(cluster: NatsCluster, old: str) -> None:
    """Until DISPATCH and EVENTS both name a leader other than `old`."""
    while True:
        with contextlib.suppress(nats.errors.Error, TimeoutError, AssertionError):
            leaders = await stream_leaders(cluster, timeout=0.5)
            if old not in leaders.values():
                return
        await asyncio.sleep(0.1)


async def inject_faults(
    submitted: asyncio.Queue[int],
    cluster: NatsCluster,
    planes: Fleet,
    faults: Faults,
) -> None:
    """Kills the DISPATCH leader node, restarts it, then kills the leading control plane,
    each when the submitter has got that far; measures each takeover."""
    count = 0
    victim = -1
    while count < KILL_PLANE_AT:
        count = await submitted.get()
        if count == KILL_NATS_AT:
            leaders = await stream_leaders(cluster)
            name = leaders[DISPATCH_STREAM]
            victim = [n.name for n in cluster.nodes].index(name)
            faults.at["nats"] = time.time()
            await asyncio.to_thread(cluster.kill, victim)
            led = ", ".join(s for s, n in leaders.items() if n == name)
            faults.done.append(f"nats {name} -9 (led {led})")
            await asyncio.wait_for(new_stream_leader(cluster, name), 60)
            faults.took["new stream leaders"] = time.time() - faults.at["nats"]
        elif count == RESTART_NATS_AT:
            faults.took["node healthy again"] = await asyncio.to_thread(cluster.restart, victim)
            faults.done.append(f"nats {cluster.nodes[victim].name} restarted")
        elif count == KILL_PLANE_AT:
            doomed = await leading_process(planes.db, planes.processes)
            faults.at["plane"] = time.time()
            doomed.kill()
            faults.done.append(f"control plane pid {doomed.pid} -9 (scheduling leader)")
            others = [p for p in planes.processes if p is not doomed]
            await asyncio.wait_for(leading_process_among(planes.db, others), 60)
            faults.took["new scheduling leader"] = time.time() - faults.at["plane"]


async def leading_process_among(db: Database, processes: list[PlaneProcess]) -> None:
    while True:
        with contextlib.suppress(AssertionError):
            await leading_process(db, processes)
            return
        await asyncio.sleep(0.05)


def seconds(stamp: Timestamp) -> float:
    return float(stamp.ToMicroseconds()) / 1e6


def resumed_after(jobs: list[types_pb2.Job], since: float) -> float:
    """Seconds from `since` until the next job SUCCEEDED."""
    return min(seconds(j.finished_at) - since for j in jobs if seconds(j.finished_at) > since)


def longest_stall(jobs: list[types_pb2.Job]) -> float:
    """The longest time between two consecutive jobs' ends (how long throughput stopped)."""
    ends = sorted(seconds(j.finished_at) for j in jobs)
    return max(b - a for a, b in itertools.pairwise(ends))


async def ledger_rows(db: Database) -> tuple[dict[str, str], Counter[str], dict[str, int]]:
    """Per job: its hold's state, how many RELEASE transfers it has and what it was charged
    net (charges and fees minus refunds), straight from the ledger tables."""
    async with db.read() as session:
        holds = {
            str(r.job_id): str(r.state)
            for r in await session.execute(text("SELECT job_id, state FROM holds"))
        }
        releases: Counter[str] = Counter()
        net: Counter[str] = Counter()
        for row in await session.execute(
            text("SELECT job_id, kind, amount FROM transfers WHERE job_id IS NOT NULL")
        ):
            job = str(row.job_id)
            if row.kind == "release":
                releases[job] += 1
            elif row.kind in ("charge", "fee"):
                net[job] += int(row.amount)
            elif row.kind == "refund":
                net[job] -= int(row.amount)
    return holds, releases, dict(net)


async def history(db: Database, job_id: str) -> str:
    """A job's attempts, events and transfers as rows, for an assertion message."""
    queries = {
        "attempts": "SELECT attempt, host_id, state, live, lost, report_seq, run_time_ms,"
        " charged, reason FROM job_attempts WHERE job_id = :j ORDER BY attempt",
        "events": "SELECT seq, attempt, state, reason, time FROM job_events"
        " WHERE job_id = :j ORDER BY seq",
        "transfers": "SELECT kind, amount, attempt, idempotency_key FROM transfers"
        " WHERE job_id = :j ORDER BY created_at",
    }
    lines = [f"job {job_id}"]
    async with db.read() as session:
        for name, query in queries.items():
            lines.append(f"{name}:")
            rows = await session.execute(text(query), {"j": job_id})
            lines.extend(f"  {tuple(row)}" for row in rows)
    return "\n".join(lines)


async def succeeded_events(db: Database) -> Counter[str]:
    async with db.read() as session:
        rows = await session.scalars(
            text("SELECT job_id FROM job_events WHERE state = 'succeeded'")
        )
        return Counter(str(job) for job in rows)


async def test_200_jobs_survive_a_nats_node_and_a_control_plane_dying(
    tmp_path: Path,
    pg_url: str,
    nats_cluster: NatsCluster,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = plane_options(
        pg_url,
        nats_cluster,
        s3_server,
        nats_stream_replicas=3,
        heartbeat_timeout_ms=10_000,
        retry_backoff_ms=200,
        dispatch_ack_timeout_ms=60_000,
    )
    daemons: list[subprocess.Popen[bytes]] = []
    async with fleet(tmp_path, options, monkeypatch) as planes:
        first, second = planes.spawn("cp-a"), planes.spawn("cp-b")
        addresses = f"127.0.0.1:{first.port},127.0.0.1:{second.port}"
        channel = grpc.aio.insecure_channel(grpc_target(addresses))
        client = Client(channel, planes.admin_key)
        try:
            await until(lambda: serving_and_leading(planes), 60, "both planes serve, one leads")
            client.consumer, client.consumer_key = await client.tenant("consumer", S.ROLE_CONSUMER)
            client.provider, _ = await client.tenant("provider", S.ROLE_PROVIDER)
            await ledger_pb2_grpc.LedgerServiceStub(channel).Deposit(
                ledger_pb2.DepositRequest(
                    tenant_id=client.consumer,
                    amount_micro_credits=DEPOSIT * CREDIT,
                    idempotency_key="initial",
                ),
                metadata=client.auth(client.admin_key),
            )
            for n in range(DAEMONS):
                token = await mint_token(channel, client.admin_key, client.provider)
                daemons.append(
                    spawn_daemon(
                        tmp_path / f"daemon-{n}",
                        addresses,
                        token,
                        nats_cluster,
                        s3_server,
                        docker_engine,
                    )
                )
            await until(lambda: hosts_online(planes.db, DAEMONS), 60, "the daemons are online")
            leaders: dict[str, str] = {}

            async def streams_led() -> bool:
                # The planes create the streams once connected: maybe not all of them yet.
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    leaders.update(await stream_leaders(nats_cluster))
                return len(leaders) == 2

            await until(streams_led, 30, "DISPATCH and EVENTS have leaders")

            began = time.time()
            submitted: asyncio.Queue[int] = asyncio.Queue()
            faults = Faults()
            injector = asyncio.create_task(inject_faults(submitted, nats_cluster, planes, faults))
            ids: list[str] = []
            for index in range(JOBS):
                ids.append(await client.submit(index))
                submitted.put_nowait(len(ids))
                await asyncio.sleep(SUBMIT_GAP)
                if injector.done():
                    injector.result()  # a failed fault step fails the test now
            await injector

            async def all_ended() -> bool:
                for process in daemons:
                    assert process.poll() is None, f"a daemon exited ({process.returncode})"
                return await ended(planes.db) >= JOBS

            try:
                await until(all_ended, 180, f"all {JOBS} jobs end")
            except AssertionError as error:
                states = await by_state(planes.db)
                raise AssertionError(f"{error}; jobs by state: {states}") from None
            wall = time.time() - began
            jobs = {j.job_id: j for j in await client.jobs()}

            # Every job SUCCEEDED, exactly once, on exactly one succeeded attempt.
            assert len(ids) == JOBS
            assert sorted(jobs) == sorted(set(ids))
            states = Counter(S.JobState.Name(j.state) for j in jobs.values())
            assert states == {"JOB_STATE_SUCCEEDED": JOBS}, states
            events = await succeeded_events(planes.db)
            assert all(events[job_id] == 1 for job_id in ids), events
            for job in jobs.values():
                won = [a for a in job.attempts if a.state == S.JOB_STATE_SUCCEEDED]
                why = await history(planes.db, job.job_id)
                assert len(won) == 1, why
                assert won[0].attempt == job.attempt, why
                # Charged something: the 0.1 s job ran (even where Docker's own times say 0).
                assert won[0].charged_micro_credits == job.charged_micro_credits > 0, why
                assert all(a.charged_micro_credits == 0 for a in job.attempts if a is not won[0]), (
                    why
                )

            # Charged once: one hold per job, posted once, one release; net charges = the job's.
            holds, releases, net = await ledger_rows(planes.db)
            for job_id, job in jobs.items():
                assert holds[job_id] == "posted", (job_id, holds.get(job_id))
                assert releases[job_id] == 1, (job_id, releases[job_id])
                assert net[job_id] == job.charged_micro_credits, job_id

            # The books: every balance sums to zero; the consumer paid what the provider
            # earned plus the platform's fees, and exactly the jobs' charges.
            check = await ledger_pb2_grpc.LedgerServiceStub(channel).CheckLedger(
                ledger_pb2.CheckLedgerRequest(), metadata=client.auth(client.admin_key)
            )
            assert check.balance_sum_micro_credits == 0, check
            assert check.consistent, check
            consumer = await client.balance(client.consumer)
            provider = await client.balance(client.provider)
            spent = (
                DEPOSIT * CREDIT - consumer.available_micro_credits - consumer.held_micro_credits
            )
            assert consumer.held_micro_credits == 0
            charged = sum(j.charged_micro_credits for j in jobs.values())
            assert spent == charged == provider.earnings_micro_credits + await revenue(planes.db)

            retried = sum(1 for j in jobs.values() if j.attempt > 1)
            listed = list(jobs.values())
            took = ", ".join(f"{what} {t:.1f}s" for what, t in faults.took.items())
            print(
                f"\n[topology] {JOBS} jobs SUCCEEDED once each on {DAEMONS} daemon processes, "
                f"2 control planes, 3 NATS nodes (R3; leaders at start {leaders}) in "
                f"{wall:.1f}s; attempts > 1: {retried}; kills: {'; '.join(faults.done)}; "
                f"took: {took}; jobs succeeding again "
                f"{resumed_after(listed, faults.at['nats']):.1f}s after the NATS kill, "
                f"{resumed_after(listed, faults.at['plane']):.1f}s after the plane kill; "
                f"longest stall between job ends {longest_stall(listed):.1f}s; "
                f"charged {charged} micro-credits, ledger sum 0"
            )
        finally:
            for process in daemons:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
                process.wait(10)
            await channel.close(None)
            remove_containers(docker_engine)


async def serving_and_leading(planes: Fleet) -> bool:
    """Both planes answer health checks and one holds the scheduler lease."""
    for process in planes.processes:
        assert process.process.poll() is None, f"a plane exited:\n{process.output()}"
        if not await serving(process.port):
            return False
    return await lease(planes.db) is not None


async def hosts_online(db: Database, count: int) -> bool:
    async with db.read() as session:
        online = await session.scalar(text("SELECT count(*) FROM hosts WHERE state = 'online'"))
    return int(online or 0) >= count


async def ended(db: Database) -> int:
    """Jobs in a terminal state."""
    async with db.read() as session:
        done = await session.scalar(
            text(
                "SELECT count(*) FROM jobs WHERE state IN "
                "('succeeded', 'failed', 'cancelled', 'timed_out', 'rejected')"
            )
        )
    return int(done or 0)


async def by_state(db: Database) -> dict[str, int]:
    async with db.read() as session:
        rows = await session.execute(text("SELECT state, count(*) FROM jobs GROUP BY state"))
        return {str(state): int(count) for state, count in rows}


async def revenue(db: Database) -> int:
    async with db.read() as session:
        value = await session.scalar(
            text("SELECT balance FROM accounts WHERE id = 'platform:revenue'")
        )
    return int(value or 0)


def remove_containers(engine: DockerEngine) -> None:
    """The killed daemons' containers (if any ran on) would outlive the test."""
    client = engine.client()
    try:
        for container in client.api.containers(all=True, filters={"label": "gpuplane.job"}):
            with contextlib.suppress(Exception):
                client.api.remove_container(container["Id"], force=True)
    finally:
        client.close()
