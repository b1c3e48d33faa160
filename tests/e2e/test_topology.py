"""The scale-out topology under faults: a 3-node NATS cluster (streams at R3), two control
planes on one PostgreSQL and three daemons, all separate processes, run 200 jobs while the
DISPATCH stream's leader node is killed (-9) and restarted and the scheduling leader's
control plane is killed (-9) for good. Every job ends SUCCEEDED once, charged once, and the
books balance."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import nats.errors
import pytest
from gpuplane.v1 import (
    ledger_pb2,
    ledger_pb2_grpc,
    types_pb2,
)

from daemon.target import grpc_target
from devstack import DockerEngine, NatsCluster, S3Server
from devstack.factories import new_tenant, new_token
from messaging.subjects import DISPATCH_STREAM
from tests.controlplane.scheduler.planes import Fleet, fleet, plane_options, until
from tests.controlplane.scheduler.probes import lease
from tests.e2e.test_control_plane_failover import serving
from tests.e2e.topology import (
    CREDIT,
    DEPOSIT,
    Client,
    by_state,
    ended,
    history,
    hosts_online,
    leading_process,
    leading_process_among,
    ledger_rows,
    longest_stall,
    new_stream_leader,
    remove_containers,
    resumed_after,
    revenue,
    spawn_daemon,
    stream_leaders,
    succeeded_events,
)
from tests.serving import serve

pytestmark = [pytest.mark.timeout(420), pytest.mark.docker, pytest.mark.postgres]
S = types_pb2
JOBS = 200
DAEMONS = 3
# Submits are spread so that the faults land mid-run: one every SUBMIT_GAP seconds.
SUBMIT_GAP = 0.12
KILL_NATS_AT, RESTART_NATS_AT, KILL_PLANE_AT = 40, 90, 120  # after this many submits


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    yield from serve(NatsCluster(tmp_path / "nats"))


@dataclass
class Faults:
    """What the fault task did and how long each takeover took, with wall-clock times of
    the kills to relate to the jobs' timestamps."""

    done: list[str] = field(default_factory=list)
    at: dict[str, float] = field(default_factory=dict)
    took: dict[str, float] = field(default_factory=dict)


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
            client.consumer, client.consumer_key = await new_tenant(
                client, "consumer", S.ROLE_CONSUMER
            )
            client.provider, _ = await new_tenant(client, "provider", S.ROLE_PROVIDER)
            await ledger_pb2_grpc.LedgerServiceStub(channel).Deposit(
                ledger_pb2.DepositRequest(
                    tenant_id=client.consumer,
                    amount_micro_credits=DEPOSIT * CREDIT,
                    idempotency_key="initial",
                ),
                metadata=client.auth(client.admin_key),
            )
            for n in range(DAEMONS):
                token = (await new_token(client, client.provider)).secret
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
                with contextlib.suppress(nats.errors.Error, TimeoutError, AssertionError):
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
