"""Signs of life arriving together are recorded together: a hundred hellos at once cost a
couple of transactions, each host is answered on its own (an unknown one is refused without
failing the others), and every host is up with its GPUs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.errors import NotFound
from controlplane.registry.service import RegistryService
from devstack.factories import new_online_host
from tests.controlplane.registry.test_liveness_writes import SlowDatabase
from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(60), pytest.mark.plane(heartbeat_timeout_ms=600_000)]
HOSTS = 12


class CountingDatabase(SlowDatabase):
    """The plane's database, counting the transactions begun on it."""

    transactions = 0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        self.transactions += 1
        async with super().transaction() as session:
            yield session


async def test_hellos_arriving_together_are_recorded_in_few_transactions(
    plane: JobPlane,
) -> None:
    assert plane.plane.db is not None
    token = await plane.token()
    hosts = [(await new_online_host(plane.channel, token)).host_id for _ in range(HOSTS)]
    db = CountingDatabase(plane.plane.db)
    registry = RegistryService(db, max_price=10**12)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(
        *(registry.connect(host_id) for host_id in [*hosts, "host_nope"]),
        return_exceptions=True,
    )
    refused = outcomes.pop()
    assert isinstance(refused, NotFound), refused
    assert "host_nope" in refused.message
    assert [host.id for host in outcomes if not isinstance(host, BaseException)] == hosts
    # The first caller writes its own; the rest, waiting by then, are written together.
    assert db.transactions <= 2, db.transactions
    assert all(host_id in registry._up for host_id in hosts)
    # A lone heartbeat of a host not up here takes the same path on its own.
    registry._up.discard(hosts[0])
    await registry.heartbeat(hosts[0])
    assert hosts[0] in registry._up
    assert db.transactions <= 3, db.transactions
