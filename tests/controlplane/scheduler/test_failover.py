"""Two control planes on one PostgreSQL database (real NATS and S3; the daemon played by a
scripted host): one scheduling leader; when it is killed, frozen, cut off from its lock or
shut down, the other takes over and no job or GPU is ever placed twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import types_pb2

from controlplane.errors import NotLeader
from tests.controlplane.scheduler.planes import InProcessPlane, fleet, plane_options, until
from tests.controlplane.scheduler.probes import lease, lock_holders, placements, terminate
from tests.controlplane.scripted_host import ScriptedHost

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

SCHEDULED = [types_pb2.JOB_STATE_SCHEDULED]


async def submit_and_place(
    plane: InProcessPlane, host: ScriptedHost, count: int, timeout: float = 10.0
) -> list[str]:
    """Submits `count` one-GPU jobs through `plane`, waits until each is placed and its
    dispatch reached the host; returns their ids."""
    ids = [(await plane.api.submit(gpu_count=1)).job_id for _ in range(count)]
    for job_id in ids:
        await plane.api.wait_for(job_id, SCHEDULED, timeout=timeout)
    dispatched = {(await host.next_dispatch(timeout=timeout)).job_id for _ in ids}
    assert dispatched == set(ids)
    return ids


async def test_one_leader_places_and_hands_over_on_shutdown(
    tmp_path: Path, pg_url: str, nats_server: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = plane_options(pg_url, nats_server, s3_server)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        first = await planes.start("first")
        await until(lambda: first.leading, 10, "the first plane leads")
        second = await planes.start("second")
        leader = second.plane.leader
        assert leader is not None
        # The second has tried (its lock connection is open) and follows.
        await until(lambda: second.lock_pid is not None, 10, "the second tried")
        assert not second.leading
        assert await lock_holders(first.db) == [first.lock_pid]
        assert (first.gauge(), second.gauge()) == (1.0, 0.0)

        host = await planes.host(second, gpus=4)  # on the plane that stays
        placed = await submit_and_place(second, host, 2)  # asked of the follower
        assert (first.counter.placed, second.counter.placed) == (2, 0)
        # The follower's fence refuses a placement outright.
        with pytest.raises(NotLeader):
            async with second.db.transaction() as session:
                await leader.fence(session)

        started = time.monotonic()
        await planes.stop(first)  # graceful: leadership is given up first
        handover = await until(lambda: second.leading, 5, "the second takes over")
        # Well inside the 3 s ttl after which an abandoned lock session would end anyway.
        assert handover < 2.0, f"handover took {time.monotonic() - started:.2f}s"
        assert second.gauge() == 1.0
        placed += await submit_and_place(second, host, 2)
        assert second.counter.placed == 2
        assert (await lease(second.db) or (0, ""))[0] == 2
        (await placements(second.db)).assert_no_duplicates(placed)


async def test_killed_leader_is_replaced_within_10s_without_duplicates(
    tmp_path: Path, pg_url: str, nats_server: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = plane_options(pg_url, nats_server, s3_server)
    # The default leadership settings, as deployed: the bound must hold with those.
    del options["scheduler_leader_check_interval_ms"], options["scheduler_lease_ttl_ms"]
    async with fleet(tmp_path, options, monkeypatch) as planes:
        doomed = planes.spawn("doomed")  # a real process, so kill -9 is real
        await doomed.wait_leading(planes.db)
        survivor = await planes.start("survivor")
        await until(lambda: survivor.lock_pid is not None, 10, "the survivor tried")
        assert not survivor.leading
        holders = await lock_holders(survivor.db)
        assert len(holders) == 1
        assert holders != [survivor.lock_pid]

        host = await planes.host(survivor, gpus=8)
        before = await submit_and_place(survivor, host, 3)
        assert survivor.counter.placed == 0  # the child process placed them

        doomed.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        doomed.process.wait(10)
        after = [(await survivor.api.submit(gpu_count=1)).job_id for _ in range(3)]
        for job_id in after:
            await survivor.api.wait_for(job_id, SCHEDULED, timeout=10)
        takeover = time.monotonic() - killed_at
        print(f"takeover after SIGKILL: {takeover:.2f}s")
        assert takeover < 10
        assert survivor.leading
        assert survivor.counter.placed == 3
        assert {(await host.next_dispatch()).job_id for _ in after} == set(after)
        assert (await lease(survivor.db) or (0, ""))[0] == 2
        assert await lock_holders(survivor.db) == [survivor.lock_pid]
        (await placements(survivor.db)).assert_no_duplicates(before + after)


async def test_frozen_leader_is_replaced_and_steps_down_when_thawed(
    tmp_path: Path, pg_url: str, nats_server: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = plane_options(pg_url, nats_server, s3_server, scheduler_lease_ttl_ms=2000)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        frozen = planes.spawn("frozen")
        await frozen.wait_leading(planes.db)
        survivor = await planes.start("survivor")
        host = await planes.host(survivor, gpus=8)
        before = await submit_and_place(survivor, host, 2)

        os.kill(frozen.pid, signal.SIGSTOP)  # alive, its sockets open, but silent
        took = await until(lambda: survivor.leading, 10, "the survivor takes over")
        assert took < 2.0 + 2.0  # the ttl, then the next check
        during = await submit_and_place(survivor, host, 2)
        os.kill(frozen.pid, signal.SIGCONT)
        await until(
            lambda: "lost scheduling leadership" in frozen.output(), 10, "the thawed one yields"
        )
        after = await submit_and_place(survivor, host, 2)
        assert survivor.counter.placed == 4
        assert frozen.process.poll() is None  # it lives on as a follower
        (await placements(survivor.db)).assert_no_duplicates(before + during + after)


async def test_leader_cut_off_from_its_lock_is_fenced(
    tmp_path: Path, pg_url: str, nats_server: Any, s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = plane_options(pg_url, nats_server, s3_server)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        # The stale one checks its lock only rarely: only its fence can stop it.
        stale = await planes.start(
            "stale", scheduler_leader_check_interval_ms=60_000, scheduler_lease_ttl_ms=120_000
        )
        await until(lambda: stale.leading, 10, "it leads")
        successor = await planes.start("successor")
        host = await planes.host(successor, gpus=4)
        before = await submit_and_place(stale, host, 1)
        assert stale.counter.placed == 1

        await terminate(stale.db, stale.lock_pid)
        await until(lambda: successor.leading, 10, "the successor takes over")
        # Its scheduling loop still believes it leads; its next cycle is fenced off.
        await until(lambda: stale.counter.fenced > 0, 10, "the stale cycle is fenced")
        assert not stale.leading
        assert stale.gauge() == 0.0
        after = await submit_and_place(stale, host, 2)  # asked of the stale one
        assert (stale.counter.placed, successor.counter.placed) == (1, 2)
        (await placements(successor.db)).assert_no_duplicates(before + after)
