"""A daemon's restart reports (ReplicaHealth.restarts) on a real control plane, SQLite and
PostgreSQL: taken only from the replica's host for its current attempt, one restart more per
report at most, never lowered, each a service event; they change nothing of the job (state,
hold, lease, charge)."""

from __future__ import annotations

import pytest
from gpuplane.v1 import registry_pb2, services_pb2, types_pb2

from devstack.factories import new_online_host
from tests.controlplane.test_services_api import deploy, stub, until
from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(60), pytest.mark.databases("sqlite", "postgresql")]


def job_facts(job: types_pb2.Job) -> tuple[object, ...]:
    return (job.state, job.attempt, job.hold_micro_credits, job.spec.max_duration_seconds)


async def test_restart_reports_count_one_at_a_time_from_the_replicas_host_only(
    plane: JobPlane,
) -> None:
    auth = plane.auth(plane.consumer_key)
    host = await new_online_host(plane.channel, await plane.token())
    other = await new_online_host(plane.channel, await plane.token())
    await stub(plane).DeployService(deploy(replicas=1), metadata=auth)
    placed = await until(plane, "web", lambda s: any(r.host_id for r in s.replicas))
    replica = placed.replicas[0]
    assert replica.host_id in (host.host_id, other.host_id)
    stranger = other.host_id if replica.host_id == host.host_id else host.host_id
    before = job_facts(await plane.get(replica.replica_id))
    services = plane.plane.services
    assert services is not None

    async def report(host_id: str, restarts: int, attempt: int = 1, why: str = "") -> int:
        health = registry_pb2.ReplicaHealth(
            job_id=replica.replica_id, attempt=attempt, ready=False, reason=why, restarts=restarts
        )
        await services.replica_health(host_id, health)
        got = await stub(plane).GetService(
            services_pb2.GetServiceRequest(service="web"), metadata=auth
        )
        return got.service.replicas[0].restarts

    assert await report(stranger, 3) == 0, "another host's word"
    assert await report(replica.host_id, 3, attempt=2) == 0, "another attempt's"
    assert await report(replica.host_id, 5, why="exited with code 137; restart 5 in 1 s") == 1
    assert await report(replica.host_id, 5) == 2, "one more per report at most"
    assert await report(replica.host_id, 1) == 2, "never lowered"
    service = (
        await stub(plane).GetService(services_pb2.GetServiceRequest(service="web"), metadata=auth)
    ).service
    reasons = [e.reason for e in service.events]
    assert (
        f"replica {replica.replica_id} restarted in place (1): exited with code 137; "
        "restart 5 in 1 s"
    ) in reasons, reasons
    assert f"replica {replica.replica_id} restarted in place (2)" in reasons, reasons
    assert service.restarts == 0, "a restart in place is no replacement"
    assert job_facts(await plane.get(replica.replica_id)) == before, "the job is untouched"
