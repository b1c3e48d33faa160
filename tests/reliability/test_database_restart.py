"""PostgreSQL restarted under load (reliability issue item 5): clients keep submitting jobs and
depositing credit, each call with its own idempotency key, while a private cluster is stopped in
immediate mode (SIGQUIT: no checkpoint, clients cut off mid-transaction) and started again on the
same data directory and port. Afterwards no acknowledged submit or deposit may be missing, every
call retried with its key must answer the original result (or create exactly one), and the ledger
must balance to the micro-credit."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from gpuplane.v1 import jobs_pb2, ledger_pb2, types_pb2
from psycopg import sql

from devstack import NatsServer, PostgresCluster, S3Server
from tests.harness import CREDIT, JobPlane, job_plane
from tests.reliability import summary

S = types_pb2
pytestmark = pytest.mark.timeout(120)

SUBMITTERS = 6
DEPOSITORS = 4
DEPOSIT = CREDIT // 100  # 0.01 credit per deposit
PRICE = CREDIT  # 1 credit per GPU-hour: a 60 s job holds 1/60 credit
CALL_TIMEOUT = 10.0
# Codes a client may see while the database is away; each says "try again" or "not done".
CLEAN_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


@dataclass
class Call:
    """One mutating request with its idempotency key, and what the first try answered."""

    kind: str  # "submit" or "deposit"
    key: str
    request: jobs_pb2.SubmitJobRequest | ledger_pb2.DepositRequest
    result: str = ""  # job_id or transfer_id when acknowledged
    code: grpc.StatusCode | None = None  # the failure's code otherwise
    details: str = ""


@dataclass
class Load:
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[PostgresCluster]:
    """A cluster of this test's own, so that restarting it disturbs no other test."""
    cluster = PostgresCluster(tmp_path / "pg")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def stop_immediately(cluster: PostgresCluster) -> None:
    """Stops the cluster's postmaster in immediate mode (SIGQUIT): no checkpoint, every
    backend cut off mid-transaction, crash recovery on the next start."""
    process = cluster._process
    assert process is not None
    assert process.running
    process.stop_signal = signal.SIGQUIT
    process.stop()


def start_again(cluster: PostgresCluster) -> None:
    """Starts the stopped postmaster with the same argv (same data dir, same port, so the
    control plane's pool can reconnect) and waits until it answers queries."""
    process = cluster._process
    assert process is not None
    assert not process.running
    if process.user is not None:
        # Popen(user=...) must fork() rather than vfork(), and a fork() of this process, with
        # grpc's threads running, can crash in the child before exec (seen: SIGSEGV). setpriv
        # drops to the postgres user after a vfork-able spawn instead.
        user, process.user = process.user, None
        setpriv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"]
        process.argv = setpriv + process.argv
    process.start()
    process.wait_ready(cluster._accepts_queries, 60.0, "a SELECT 1 after the restart")


def restart_immediately(cluster: PostgresCluster, down_seconds: float) -> float:
    """stop_immediately, `down_seconds` down, start_again; the seconds it was away."""
    began = time.monotonic()
    stop_immediately(cluster)
    time.sleep(down_seconds)
    start_again(cluster)
    return time.monotonic() - began


def durable_commits(cluster: PostgresCluster, dbname: str) -> None:
    """devstack runs PostgreSQL with synchronous_commit=off, which may lose the last commits
    in an immediate shutdown *by design*; production runs with it on. A per-database setting
    outranks the command line, so the control plane's sessions commit durably here (fsync=off
    is harmless: the kernel's page cache survives a killed postmaster)."""
    query = sql.SQL("ALTER DATABASE {} SET synchronous_commit = on")
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(query.format(sql.Identifier(dbname)))


def submit_request(key: str) -> jobs_pb2.SubmitJobRequest:
    spec = S.JobSpec(
        image="gpuplane-test/busybox:1",
        gpu_count=1,
        max_duration_seconds=60,
        max_price_per_gpu_hour_micro_credits=PRICE,
    )
    return jobs_pb2.SubmitJobRequest(spec=spec, idempotency_key=key)


def deposit_request(tenant: str, key: str) -> ledger_pb2.DepositRequest:
    return ledger_pb2.DepositRequest(
        tenant_id=tenant, amount_micro_credits=DEPOSIT, reference=key, idempotency_key=key
    )


async def send(plane: JobPlane, call: Call) -> str:
    """Sends the call once; the job or transfer id it answers."""
    if isinstance(call.request, jobs_pb2.SubmitJobRequest):
        submitted = await plane.jobs.SubmitJob(
            call.request, metadata=plane.auth(plane.consumer_key), timeout=CALL_TIMEOUT
        )
        return submitted.job.job_id
    deposited = await plane.ledger.Deposit(
        call.request, metadata=plane.auth(), timeout=CALL_TIMEOUT
    )
    return deposited.transfer_id


async def client(plane: JobPlane, load: Load, kind: str, worker: int) -> None:
    """Sends fresh calls in a loop until told to stop, recording each first answer."""
    for n in range(1_000_000):
        if load.stop.is_set():
            return
        key = f"{kind}-{worker}-{n}"
        request = (
            submit_request(key) if kind == "submit" else deposit_request(plane.consumer_tenant, key)
        )
        call = Call(kind, key, request)
        load.calls.append(call)
        try:
            call.result = await send(plane, call)
        except grpc.aio.AioRpcError as error:
            call.code, call.details = error.code(), error.details() or ""
            await asyncio.sleep(0.01)  # a failing dependency is not hammered in a tight loop


async def retry_until_answered(
    plane: JobPlane, call: Call, deadline: float, tries: Counter[str]
) -> str:
    """The retry a client with an idempotency key makes after the outage."""
    while True:
        tries[call.kind] += 1
        try:
            return await send(plane, call)
        except grpc.aio.AioRpcError as error:
            if error.code() not in CLEAN_CODES or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def all_jobs(plane: JobPlane) -> list[S.Job]:
    jobs: list[S.Job] = []
    token = ""
    while True:
        page = await plane.jobs.ListJobs(
            jobs_pb2.ListJobsRequest(page_size=500, page_token=token),
            metadata=plane.auth(plane.consumer_key),
        )
        jobs += page.jobs
        token = page.next_page_token
        if not token:
            return jobs


async def deposit_entries(plane: JobPlane) -> list[S.LedgerEntry]:
    entries: list[S.LedgerEntry] = []
    token = ""
    while True:
        page = await plane.ledger.ListEntries(
            ledger_pb2.ListEntriesRequest(
                tenant_id=plane.consumer_tenant,
                account_kinds=[S.ACCOUNT_KIND_AVAILABLE],
                kinds=[S.TRANSFER_KIND_DEPOSIT],
                page_size=500,
                page_token=token,
            ),
            metadata=plane.auth(),
        )
        entries += page.entries
        token = page.next_page_token
        if not token:
            return entries


@pytest.fixture
async def plane_on_private_pg(
    tmp_path: Path,
    private_postgres: PostgresCluster,
    nats_server: NatsServer,
    s3_server: S3Server,
) -> AsyncIterator[JobPlane]:
    dbname = private_postgres.create_database("restart_under_load")
    durable_commits(private_postgres, dbname)

    def configure(options: dict[str, object]) -> None:
        options["rate_limit_per_second"] = 0  # the load is the point, not the rate limit

    async with job_plane(
        tmp_path / "cp",
        nats_server.url,
        s3_server,
        database_url=private_postgres.url(dbname),
        configure=configure,
    ) as plane:
        yield plane


async def test_postgres_restart_under_load_loses_nothing(
    plane_on_private_pg: JobPlane, private_postgres: PostgresCluster
) -> None:
    plane = plane_on_private_pg
    started = time.monotonic()
    load = Load()
    workers = [asyncio.create_task(client(plane, load, "submit", i)) for i in range(SUBMITTERS)] + [
        asyncio.create_task(client(plane, load, "deposit", i)) for i in range(DEPOSITORS)
    ]

    await asyncio.sleep(1.5)  # load before the fault
    before = len(load.calls)
    down_for = await asyncio.to_thread(restart_immediately, private_postgres, 1.0)
    during = len(load.calls) - before
    await asyncio.sleep(2.5)  # load after the fault: the pool must reconnect by itself
    load.stop.set()
    await asyncio.gather(*workers)

    acknowledged = [c for c in load.calls if c.code is None]
    failed = [c for c in load.calls if c.code is not None]
    codes = Counter(c.code.name for c in failed if c.code is not None)
    after_restart_ok = [c for c in load.calls[before + during :] if c.code is None]
    after_restart_failed = len(load.calls) - before - during - len(after_restart_ok)

    # Every acknowledged submit exists as it was answered.
    lost: list[str] = []
    for call in acknowledged:
        if call.kind != "submit":
            continue
        try:
            job = await plane.get(call.result)
        except grpc.aio.AioRpcError as error:
            lost.append(f"{call.key} -> {call.result}: {error.code().name}")
            continue
        if job.idempotency_key != call.key:
            lost.append(f"{call.key} -> {call.result}: stored key {job.idempotency_key!r}")

    # Every acknowledged deposit is in the ledger.
    entries = await deposit_entries(plane)
    transfer_of = {e.reference: e.transfer_id for e in entries}
    lost += [
        f"{c.key} -> {c.result}: no ledger entry"
        for c in acknowledged
        if c.kind == "deposit" and transfer_of.get(c.key) != c.result
    ]

    # Every call, answered or not, retried with its key: the original result, or exactly one.
    deadline = time.monotonic() + 20
    tries: Counter[str] = Counter()
    retried = await asyncio.gather(
        *(retry_until_answered(plane, c, deadline, tries) for c in load.calls)
    )
    changed = [
        f"{c.key}: first {c.result}, retry {again}"
        for c, again in zip(load.calls, retried, strict=True)
        if c.code is None and again != c.result
    ]

    submit_keys = {c.key for c in load.calls if c.kind == "submit"}
    deposit_keys = {c.key for c in load.calls if c.kind == "deposit"}
    jobs = [j for j in await all_jobs(plane) if j.idempotency_key in submit_keys]
    jobs_by_key = Counter(j.idempotency_key for j in jobs)
    entries = [e for e in await deposit_entries(plane) if e.reference in deposit_keys]
    deposits_by_key = Counter(e.reference for e in entries)
    duplicated = [k for k, n in (jobs_by_key + deposits_by_key).items() if n > 1]
    missing = sorted((submit_keys - set(jobs_by_key)) | (deposit_keys - set(deposits_by_key)))

    # Money: 100 initial credits plus one DEPOSIT per distinct key, split between available and
    # the holds of the queued jobs; the ledger as a whole sums to zero.
    balance = await plane.balance(plane.consumer_tenant)
    holds = sum(j.hold_micro_credits for j in jobs)
    expected_total = 100 * CREDIT + DEPOSIT * len(deposits_by_key)  # 100: job_plane's own
    report = await plane.ledger.CheckLedger(ledger_pb2.CheckLedgerRequest(), metadata=plane.auth())
    imbalance = (
        abs(report.balance_sum_micro_credits)
        + abs(balance.available_micro_credits + balance.held_micro_credits - expected_total)
        + abs(balance.held_micro_credits - holds)
    )

    submits = [c for c in load.calls if c.kind == "submit"]
    note = (
        f"{len(load.calls)} calls ({len(submits)} SubmitJob, {len(load.calls) - len(submits)} "
        f"Deposit), {len(acknowledged)} acknowledged, {len(failed)} failed "
        f"{dict(codes)} ({after_restart_failed} sent after the restart), {tries.total()} "
        f"retries by key; PostgreSQL down {down_for:.1f}s (SIGQUIT, same port), "
        f"{time.monotonic() - started:.0f}s"
    )
    summary.record(
        "PostgreSQL restarted under load",
        note,
        faults_injected=1,
        requests_tried=len(load.calls) + tries.total(),
        lost_jobs=len(lost),
        ledger_imbalance=imbalance,
        unexpected_internal=codes["INTERNAL"] + codes["UNKNOWN"],
    )
    print(note)

    assert failed, "the restart should have failed some calls; the fault was not felt"
    assert after_restart_ok, "no call succeeded after the restart: the pool did not reconnect"
    assert not lost, f"acknowledged calls lost: {lost[:5]}"
    assert not changed, f"retries answered a different result: {changed[:5]}"
    assert not duplicated, f"one key created more than one job/transfer: {duplicated[:5]}"
    assert not missing, f"retried keys that created nothing: {missing[:5]}"
    assert imbalance == 0, (report, balance, expected_total, holds)
    assert report.consistent
    assert list(report.mismatches) == []
    # Clients can act on every failure: retry later (UNAVAILABLE), never INTERNAL.
    unclean = [f"{c.key}: {c.code} {c.details}" for c in failed if c.code not in CLEAN_CODES]
    assert unclean == [], f"failures with codes a client cannot act on: {unclean[:5]}"


async def test_database_outage_answers_unavailable(
    plane_on_private_pg: JobPlane, private_postgres: PostgresCluster
) -> None:
    """While PostgreSQL is down, mutations fail with UNAVAILABLE (retry later), the code the
    error table reserves for an unreachable dependency: never INTERNAL."""
    plane = plane_on_private_pg
    await plane.deposit(plane.consumer_tenant, 1, "warm-the-pool")
    await asyncio.to_thread(stop_immediately, private_postgres)
    codes: dict[str, str] = {}
    try:
        for call in (
            Call("submit", "outage-submit", submit_request("outage-submit")),
            Call("deposit", "outage-deposit", deposit_request(plane.consumer_tenant, "od")),
        ):
            try:
                await send(plane, call)
                codes[call.kind] = "OK"
            except grpc.aio.AioRpcError as error:
                codes[call.kind] = error.code().name
    finally:
        await asyncio.to_thread(start_again, private_postgres)
    assert codes == {"submit": "UNAVAILABLE", "deposit": "UNAVAILABLE"}
