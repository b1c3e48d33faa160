"""Short ids in the CLI: `jobs get 3f9a`, `hosts drain ab12` resolve a unique prefix through
ListJobs/ListHosts `id_prefix`; no match and several matches are errors naming them."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from devstack.factories import new_host
from gpuplane_cli.output import short_ids
from tests.cli.conftest import Cli, Served
from tests.cli.test_commands import new_consumer


def funded_consumer(cli: Cli, served: Served) -> tuple[str, str]:
    tenant, secret = new_consumer(cli, served)
    assert cli("ledger", "deposit", "1000", "--tenant", tenant, key=served.admin_key).code == 0
    return tenant, secret


def submit(cli: Cli, key: str, image: str = "busybox") -> str:
    run = cli("--json", "jobs", "submit", "--image", image, "--max-duration", "10m", key=key)
    assert run.code == 0, run.err
    job_id = run.json()["job_id"]  # type: ignore[index]
    assert isinstance(job_id, str)
    return job_id


def test_a_unique_prefix_stands_for_the_job_everywhere(cli: Cli, served: Served) -> None:
    _, key = funded_consumer(cli, served)
    jobs = [submit(cli, key) for _ in range(3)]
    target = jobs[0]

    for given in (target[4:12], target[:12], target[4:8].upper(), target):
        got = cli("--json", "jobs", "get", given, key=key)
        assert got.code == 0, (given, got.err)
        assert got.json()["job_id"] == target  # type: ignore[index]
    statement = cli("--json", "ledger", "statement", "--job", target[4:12], key=key)
    assert statement.code == 0, statement.err
    entries = statement.json()
    assert isinstance(entries, list)
    assert entries
    assert {e["job_id"] for e in entries} == {target}
    cancelled = cli("jobs", "cancel", target[4:14], key=key)
    assert cancelled.code == 0, cancelled.err
    assert cancelled.out == f"job {target} CANCELLED\n"


def test_no_match_several_matches_and_other_tenants_jobs(cli: Cli, served: Served) -> None:
    _, key = funded_consumer(cli, served)
    mine = sorted(submit(cli, key) for _ in range(3))
    _, other_key = funded_consumer(cli, served)
    theirs = submit(cli, other_key)

    none = cli("jobs", "get", "zzzz", key=key)
    assert none.code == 3
    assert none.err == "error: NOT_FOUND: no job matches 'zzzz'\n"
    foreign = cli("jobs", "get", theirs[:16], key=key)
    assert foreign.code == 3
    assert foreign.err == f"error: NOT_FOUND: no job matches {theirs[:16]!r}\n"

    several = cli("jobs", "get", "job_", key=key)
    assert several.code == 2
    assert several.err.startswith("error: 'job_' matches 3 jobs: ")
    assert all(job_id in several.err for job_id in mine)

    for bad in ("3f%", "a_b'", "x" * 41):
        refused = cli("jobs", "logs", bad, key=key)
        assert refused.code == 2, bad
        assert refused.err == f"error: {bad!r} is not a job id nor the start of one\n"


def test_a_host_prefix_resolves_for_drain(cli: Cli, served: Served) -> None:
    admin = served.admin_key
    made = cli("--json", "admin", "tenants", "create", f"prov-{uuid.uuid4().hex[:8]}", key=admin)
    provider = made.json()["tenant_id"]  # type: ignore[index]
    token = cli("admin", "tokens", "create", "--provider", provider, key=admin)
    assert token.code == 0, token.err

    async def register() -> str:
        async with grpc.aio.insecure_channel(served.addr) as channel:
            return str((await new_host(channel, token.out.splitlines()[-1])).host_id)

    host_id = asyncio.run(register())
    drained = cli("--json", "hosts", "drain", host_id[5:13], key=admin)
    assert drained.code == 0, drained.err
    assert drained.json()["host_id"] == host_id  # type: ignore[index]
    missing = cli("hosts", "drain", "zz12", key=admin)
    assert missing.code == 3
    assert missing.err == "error: NOT_FOUND: no host matches 'zz12'\n"


def test_short_ids_are_unique_prefixes_of_at_least_eight() -> None:
    a = "job_" + "3f9a0c12" + "0" * 24
    b = "job_" + "3f9a0c12" + "0" * 23 + "1"
    c = "job_" + "3f9b" + "0" * 28
    host = "host_" + "ab" * 16
    shown = short_ids([a, b, c, host])
    assert shown[c] == "job_3f9b0000"
    assert shown[host] == "host_abababab"
    assert shown[a] == a  # they differ only in the last character
    assert shown[b] == b
    assert short_ids(["job_" + "1" * 9 + "0" * 23, "job_" + "1" * 8 + "2" + "0" * 23]) == {
        "job_" + "1" * 9 + "0" * 23: "job_111111111",  # one past what they share
        "job_" + "1" * 8 + "2" + "0" * 23: "job_111111112",
    }
