"""Group commit: a lone request runs at once, concurrent ones share batches, errors per request."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from controlplane.ledger.batch import GroupCommit


async def test_group_commit_runs_a_lone_request_at_once_and_hands_errors_back() -> None:
    seen: list[list[int]] = []

    async def execute(batch: Sequence[int]) -> list[int | Exception]:
        items = list(batch)
        seen.append(items)
        await asyncio.sleep(0.01)
        return [ValueError(n) if n < 0 else n * 2 for n in items]

    commit: GroupCommit[int, int] = GroupCommit(execute, max_batch=4, max_in_flight=1)
    assert await commit(1) == 2
    calls = (commit(n) for n in (1, -2, 3, 4, 5, 6))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 2
    assert isinstance(results[1], ValueError)
    assert results[2:] == [6, 8, 10, 12]
    assert seen[0] == [1]
    assert [len(b) for b in seen[1:]] == [4, 2]


async def test_a_failing_batch_fails_each_of_its_callers() -> None:
    async def execute(batch: Sequence[int]) -> list[int | Exception]:
        raise RuntimeError("database down")

    commit: GroupCommit[int, int] = GroupCommit(execute)
    results = await asyncio.gather(commit(1), commit(2), return_exceptions=True)
    assert [str(r) for r in results] == ["database down", "database down"]


async def _turns(n: int = 5) -> None:
    """Lets the event loop run queued callbacks and tasks for `n` turns."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_waiting_requests_share_the_free_slots_in_batches_worth_a_transaction() -> None:
    seen: list[list[int]] = []
    release = asyncio.Event()

    async def execute(batch: Sequence[int]) -> list[int | Exception]:
        seen.append(list(batch))
        await release.wait()
        return list(batch)

    commit: GroupCommit[int, int] = GroupCommit(
        execute, max_batch=128, max_in_flight=2, min_batch=16
    )
    first = [asyncio.ensure_future(commit(n)) for n in range(32)]
    await _turns()
    # Both slots busy: 32 waiting became two overlapping batches of 16.
    assert [len(b) for b in seen] == [16, 16]
    release.set()
    assert await asyncio.gather(*first) == list(range(32))

    seen.clear()
    release.clear()
    running = asyncio.ensure_future(commit(100))
    await _turns()
    assert seen == [[100]]  # nothing else running: a lone request runs at once
    few = [asyncio.ensure_future(commit(n)) for n in range(5)]
    await _turns()
    # A slot is free, but 5 are too few for a transaction beside the running one: they wait
    # for it and then go together.
    assert seen == [[100]]
    release.set()
    assert await asyncio.gather(running, *few) == [100, 0, 1, 2, 3, 4]
    assert seen == [[100], [0, 1, 2, 3, 4]]
