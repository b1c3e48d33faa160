"""Short ids on the server: ListJobs/ListHosts `id_prefix` matches literally, within what the
caller may read, and refuses what cannot be the start of an id."""

from __future__ import annotations

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, registry_pb2, registry_pb2_grpc

from controlplane.db.prefix import upper_bound
from devstack.factories import bearer, new_host, new_job, new_tenant
from tests.harness import JobPlane

pytestmark = pytest.mark.databases("sqlite", "postgresql")


async def _job_ids(plane: JobPlane, key: str, prefix: str) -> list[str]:
    reply = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(id_prefix=prefix), metadata=bearer(key)
    )
    return sorted(job.job_id for job in reply.jobs)


async def test_a_job_prefix_matches_only_the_callers_jobs_literally(plane: JobPlane) -> None:
    mine = sorted([(await plane.submit(gpu_count=1)).job_id for _ in range(3)])
    other = await new_tenant(plane, "other", micro_credits=100_000_000)
    theirs = (await new_job(plane, other.key, gpu_count=1)).job_id
    key = plane.consumer_key

    assert await _job_ids(plane, key, mine[0][:12]) == [mine[0]]
    assert await _job_ids(plane, key, mine[1]) == [mine[1]]
    assert await _job_ids(plane, key, "job_") == mine
    # Another tenant's job is as absent as a missing one; an admin sees it.
    assert await _job_ids(plane, key, theirs[:14]) == []
    assert await _job_ids(plane, plane.admin_key, theirs) == [theirs]
    # `_` is a literal underscore, not LIKE's any-character.
    assert await _job_ids(plane, key, "jo__") == []
    assert await _job_ids(plane, key, "j_b_") == []
    # The prefix narrows the other filters, not the reverse.
    reply = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(id_prefix="job_", page_size=2), metadata=bearer(key)
    )
    assert len(reply.jobs) == 2
    assert reply.next_page_token


@pytest.mark.parametrize("prefix", ["job%", "JOB_", "job_3f'", "x" * 41, "job_\\"])
async def test_what_cannot_start_an_id_is_refused_naming_id_prefix(
    plane: JobPlane, prefix: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _job_ids(plane, plane.consumer_key, prefix)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("id_prefix: ")


async def test_a_host_prefix_matches_within_the_readable_hosts(plane: JobPlane) -> None:
    first = (await new_host(plane.channel, await plane.token())).host_id
    second = (await new_host(plane.channel, await plane.token())).host_id
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)

    async def host_ids(prefix: str) -> list[str]:
        reply = await registry.ListHosts(
            registry_pb2.ListHostsRequest(id_prefix=prefix), metadata=plane.auth()
        )
        return sorted(h.host_id for h in reply.hosts)

    assert await host_ids(first[:13]) == [first]
    assert await host_ids("host_") == sorted([first, second])
    assert await host_ids("hos__") == []
    assert await host_ids("job_") == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await host_ids("host%")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("id_prefix: ")


def test_the_upper_bound_is_the_next_string_of_the_id_alphabet() -> None:
    assert upper_bound("job_3f") == "job_3g"
    assert upper_bound("job_39") == "job_3_"  # '_' sorts between the digits and the letters
    assert upper_bound("job_") == "joba"
    assert upper_bound("az") == "b"
    assert upper_bound("zz") is None
