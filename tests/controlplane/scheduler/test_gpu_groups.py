"""The capacity index's GPUs, read grouped per host and kind (SchedulerRepository.gpu_groups):
PostgreSQL groups them in the query, SQLite here; both give the same groups, free and busy
uuids in index order, unhealthy GPUs and hosts in other states left out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane.auth.models import Tenant
from controlplane.db import migrate
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.registry.models import Gpu, Host
from controlplane.scheduler.capacity import Durations, load_capacity
from controlplane.scheduler.repository import SchedulerRepository

GIB = 1 << 30
A100 = ("NVIDIA A100-SXM4-80GB", 80 * GIB, "8.0")
L4 = ("NVIDIA L4", 24 * GIB, "8.9")


async def _fill(db: Database) -> None:
    now = utcnow()
    async with db.transaction() as session:
        session.add(Tenant(id="prov", name="prov", created_at=now))
        await session.flush()
        for host_id, state in (("h-online", "online"), ("h-draining", "draining")):
            session.add(
                Host(
                    id=host_id,
                    provider_tenant_id="prov",
                    machine_id=host_id,
                    hostname=host_id,
                    state=state,
                    price_per_gpu_hour=1_000_000,
                    credential_hash=host_id,
                )
            )
        await session.flush()
        # index, kind, busy with, healthy — stored out of index order on purpose.
        gpus = [
            (3, A100, None, True),
            (0, A100, "job-b", True),
            (5, L4, None, True),
            (1, A100, None, True),
            (2, A100, "job-a", True),
            (4, L4, None, False),
            (6, L4, "job-c", True),
        ]
        for index, (name, memory, cc), job_id, healthy in gpus:
            session.add(
                Gpu(
                    uuid=f"GPU-{index}",
                    host_id="h-online",
                    index=index,
                    name=name,
                    memory_total_bytes=memory,
                    compute_capability=cc,
                    job_id=job_id,
                    healthy=healthy,
                )
            )
        session.add(
            Gpu(
                uuid="GPU-other",
                host_id="h-draining",
                index=0,
                name=A100[0],
                memory_total_bytes=A100[1],
                compute_capability=A100[2],
            )
        )


@pytest.mark.databases("sqlite", "postgresql")
async def test_gpus_are_grouped_per_host_and_kind_in_index_order(
    database_url: str, tmp_path: Path
) -> None:
    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'groups.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    db = Database(url)
    try:
        await _fill(db)
        async with db.read() as session:
            groups = await SchedulerRepository(session).gpu_groups(["online"])
            capacity = await load_capacity(session, Durations())
    finally:
        await db.close()
    found = {
        (g.host_id, g.name, g.memory_total_bytes, g.compute_capability): (g.free, g.busy)
        for g in groups
    }
    assert found == {
        ("h-online", *A100): (["GPU-1", "GPU-3"], ["GPU-0", "GPU-2"]),
        ("h-online", *L4): (["GPU-5"], ["GPU-6"]),
    }
    entry = capacity.index.hosts["h-online"]
    assert sorted(uuid for uuids in entry.free.values() for uuid in uuids) == [
        "GPU-1",
        "GPU-3",
        "GPU-5",
    ]
    assert sum(len(ends) for ends in entry.busy_until.values()) == 3
    assert "h-draining" not in capacity.index.hosts
