"""Processes and probes of the topology test (tests/e2e/test_topology.py): the consumer's
client over both control planes, `gpuplane daemon run` processes, JetStream stream leaders,
the scheduling leader's process, and what the test reads straight from PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import nats.errors
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    types_pb2,
)
from sqlalchemy import text

from controlplane.db.engine import Database
from devstack import DockerEngine, NatsCluster, S3Server
from messaging.subjects import DISPATCH_STREAM, EVENTS_STREAM
from tests.controlplane.scheduler.planes import PlaneProcess
from tests.controlplane.scheduler.probes import lease

CREDIT = 1_000_000
# Credits per GPU-hour: 10 micro-credits per GPU-millisecond, so even a job that runs for a
# few milliseconds is charged something (at 2 credits it could round to nothing).
PRICE = 36
DEPOSIT = 1000
GPUS = "4xA100-80GB"  # per daemon


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
    argv = [sys.executable, "-m", "gpuplane_cli.main", "daemon", "run", "--plaintext"]
    argv += ["--control-plane", planes, "--token", token, "--data-dir", str(directory / "data")]
    argv += ["--simulate-gpus", GPUS, "--gpu-device-requests", "always"]
    argv += ["--docker-host", engine.base_url, "--nats-url", cluster.urls]
    argv += ["--price-per-gpu-hour", str(PRICE)]
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


async def new_stream_leader(cluster: NatsCluster, old: str) -> None:
    """Until DISPATCH and EVENTS both name a leader other than `old`."""
    while True:
        with contextlib.suppress(nats.errors.Error, TimeoutError, AssertionError):
            leaders = await stream_leaders(cluster, timeout=0.5)
            if old not in leaders.values():
                return
        await asyncio.sleep(0.1)


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
