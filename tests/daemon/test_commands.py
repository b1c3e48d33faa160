"""The daemon's answers to commands: a cancel of a running attempt is applied, one of an
attempt that ended here is applied (its report says how), one of an attempt taken but not
started yet waits to be sent again, and one of an attempt it never took is "not running
here" and that attempt is never run afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

from gpuplane.v1 import messaging_pb2, registry_pb2

from daemon.agent import Agent
from daemon.executor import JobExecutor
from daemon.journal import JournalEntry
from daemon.settings import DaemonSettings

A = registry_pb2.CommandAnswer


def cancel(job_id: str, attempt: int) -> registry_pb2.ControlMessage:
    return registry_pb2.ControlMessage(
        cancel=registry_pb2.CancelCommand(job_id=job_id, attempt=attempt), command_id=7
    )


async def test_cancel_answers(tmp_path: Path) -> None:
    agent = Agent(DaemonSettings(data_dir=tmp_path))
    stopped: list[int] = []

    class Executor:
        async def cancel(self, reason: int, text: str) -> None:
            stopped.append(reason)

    agent.executors[("running", 1)] = cast(JobExecutor, Executor())
    assert await agent.on_command(cancel("running", 1)) == A.COMMAND_ANSWER_APPLIED
    await asyncio.gather(*agent._tasks)
    assert stopped == [messaging_pb2.StopReason.STOP_REASON_CANCELLED]

    agent._ended_attempt(("finished", 1))
    assert await agent.on_command(cancel("finished", 1)) == A.COMMAND_ANSWER_APPLIED

    agent.journal.write(JournalEntry("taken", 1, dispatch_b64=""))
    assert await agent.on_command(cancel("taken", 1)) is None

    assert await agent.on_command(cancel("unknown", 3)) == A.COMMAND_ANSWER_NOT_RUNNING_HERE
    # Its dispatch, should it come now, is taken as already handled (_on_dispatch).
    assert ("unknown", 3) in agent._ended
    assert stopped == [messaging_pb2.StopReason.STOP_REASON_CANCELLED]


async def test_drain_is_applied(tmp_path: Path) -> None:
    agent = Agent(DaemonSettings(data_dir=tmp_path))
    drain = registry_pb2.ControlMessage(
        drain=registry_pb2.DrainCommand(draining=True, reason="kernel"), command_id=3
    )
    assert await agent.on_command(drain) == A.COMMAND_ANSWER_APPLIED
    assert (agent.draining, agent.drain_reason) == (True, "kernel")
