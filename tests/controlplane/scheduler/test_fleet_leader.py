"""GetFleetStatus on two control planes sharing one PostgreSQL database: the counts are the
same from either, the scheduler's cycles are the leading replica's, and the follower says it
is not leading until it takes over and runs cycles of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import admin_pb2

from tests.controlplane.scheduler.planes import InProcessPlane, fleet, plane_options, until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


async def status(plane: InProcessPlane) -> admin_pb2.GetFleetStatusResponse:
    return await plane.api.admin.GetFleetStatus(
        admin_pb2.GetFleetStatusRequest(), metadata=plane.api.auth()
    )


async def test_only_the_leader_reports_cycles_and_the_follower_says_so(
    tmp_path: Path, pg_url: str, nats_server: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = plane_options(pg_url, nats_server, s3_server)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        first = await planes.start("first")
        await until(lambda: first.leading, 10, "the first plane leads")
        second = await planes.start("second")
        await until(lambda: second.lock_pid is not None, 10, "the second tried")
        await second.api.submit(gpu_count=1)  # no host: it stays queued, cycle after cycle

        async def leader_cycled() -> bool:
            return (await status(first)).scheduler.last_considered == 1

        await until(leader_cycled, 10, "the leader's cycles look at the queued job")
        led, followed = await status(first), await status(second)
        assert led.scheduler_leader_here
        assert not followed.scheduler_leader_here
        assert followed.scheduler.cycles_in_window == 0
        assert not followed.scheduler.HasField("last_cycle_at")
        assert led.queue_depth == followed.queue_depth == 1

        await planes.stop(first)  # graceful: the second takes over

        async def second_cycled() -> bool:
            now = await status(second)
            return now.scheduler_leader_here and now.scheduler.last_considered == 1

        await until(second_cycled, 10, "the second leads and runs cycles")
