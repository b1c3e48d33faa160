"""The Agent's answers to the control plane's commands, acknowledged on the Connect stream."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from gpuplane.v1 import messaging_pb2, registry_pb2

from daemon.sessions import remember_dispatch

if TYPE_CHECKING:
    from daemon.agent import Agent

log = logging.getLogger(__name__)
Answer = registry_pb2.CommandAnswer
StopReason = messaging_pb2.StopReason
# A resync's known_jobs were listed at most this long before the command arrived: running
# attempts taken later are not treated as unknown to the control plane.
RESYNC_GRACE_SECONDS = 10.0


async def answer(
    agent: Agent, message: registry_pb2.ControlMessage
) -> registry_pb2.CommandAnswer.ValueType | None:
    """Acts on one command; returns the answer its CommandAck carries (None: not decided
    yet, or nothing to acknowledge: it comes again if it must)."""
    kind = message.WhichOneof("msg")
    if kind == "cancel":
        return _cancel(agent, message.cancel)
    if kind == "drain":
        # The control plane stops placing work here; running attempts finish as usual.
        agent.draining = message.drain.draining
        agent.drain_reason = message.drain.reason
        log.info("drain=%s (%s)", agent.draining, message.drain.reason or "no reason given")
        return Answer.COMMAND_ANSWER_APPLIED
    if kind == "hello_ack":
        assert agent.connect is not None
        known = {(j.job_id, j.attempt) for j in message.hello_ack.known_jobs}
        await agent.reconcile(known, listed_after=agent.connect.hello_sent_at)
    elif kind == "extend":
        return await _extend(agent, message.extend)
    elif kind == "probe":
        # Run in the background: the stream reads on; the answers follow on the stream.
        agent.start_probe(message.probe)
        return Answer.COMMAND_ANSWER_APPLIED
    elif kind == "tunnel":
        # In the background: the answer only stops re-sends; the tunnel says how it went.
        agent.tunnels.open(message.tunnel)
        return Answer.COMMAND_ANSWER_APPLIED
    elif kind == "resync":
        known = {(j.job_id, j.attempt) for j in message.resync.known_jobs}
        await agent.reconcile(known, listed_after=time.monotonic() - RESYNC_GRACE_SECONDS)
        if message.resync.HasField("missing"):
            missing = message.resync.missing
            return _here(agent, (missing.job_id, missing.attempt))
        return Answer.COMMAND_ANSWER_APPLIED
    return None


def _cancel(
    agent: Agent, command: registry_pb2.CancelCommand
) -> registry_pb2.CommandAnswer.ValueType | None:
    """Stops the attempt. An attempt that ended here was done already (its report says how);
    one this daemon never took is "not running here", and remembered as ended so that its
    dispatch, should it arrive later, is not run."""
    targets = [
        e
        for (job_id, attempt), e in agent.executors.items()
        if job_id == command.job_id and command.attempt in (0, attempt)
    ]
    for executor in targets:
        why = command.stop_reason or StopReason.STOP_REASON_CANCELLED
        agent._spawn(executor.cancel(why, command.reason))
    if targets or not command.attempt:
        return Answer.COMMAND_ANSWER_APPLIED
    return _here(agent, (command.job_id, command.attempt))


async def _extend(
    agent: Agent, command: registry_pb2.ExtendCommand
) -> registry_pb2.CommandAnswer.ValueType | None:
    """Moves a running session's deadline, and its journaled dispatch's duration (a restarted
    daemon adopts it with the new one). An attempt that ended here is done with; one not
    taken yet hears it again (None: never "not running here", which would bar its dispatch)."""
    key = (command.job_id, command.attempt)
    deadline = agent.deadlines.get(key)
    if deadline is not None:
        deadline.extend(command.max_duration_seconds)
        executor = deadline.executor
        executor.dispatch.spec.max_duration_seconds = command.max_duration_seconds
        if executor.terminal is None:
            await asyncio.to_thread(remember_dispatch, agent.journal, executor.dispatch)
        return Answer.COMMAND_ANSWER_APPLIED
    return Answer.COMMAND_ANSWER_APPLIED if key in agent._ended else None


def _here(agent: Agent, key: tuple[str, int]) -> registry_pb2.CommandAnswer.ValueType | None:
    """Whether this daemon runs or ran the attempt (APPLIED), took it without starting it yet
    (None: the command comes again), or never took it: "not running here", and remembered as
    ended so that its dispatch, should it arrive later, is not run."""
    if key in agent.executors or key in agent._ended:
        return Answer.COMMAND_ANSWER_APPLIED
    if key in agent.leftovers or agent.journal.get(*key) is not None:
        return None
    log.info("attempt %s/%s: not running here", *key)
    agent._ended_attempt(key)
    return Answer.COMMAND_ANSWER_NOT_RUNNING_HERE
