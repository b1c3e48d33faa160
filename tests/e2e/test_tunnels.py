"""Exec and port-forward through the control plane and a real daemon into a busybox container
(network none): output and exit codes, HTTP through a port-forward, errors, faults."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator

import grpc
import pytest
from gpuplane.v1 import sessions_pb2, sessions_pb2_grpc, tunnels_pb2, types_pb2

from controlplane.tunnels.broker import Pipe
from devstack import DockerEngine, NatsServer, S3Server
from devstack.factories import new_tenant
from tests.controlplane.scheduler.planes import until
from tests.e2e.tunnelstack import (
    HTTP_PORT,
    INDEX,
    TunnelStack,
    aiter_of,
    tunnel_stack,
    wait_listening,
)

T = tunnels_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> AsyncIterator[TunnelStack]:
    data_dir = tmp_path_factory.mktemp("tunnels")
    async with tunnel_stack(data_dir, nats_server, s3_server, docker_engine, test_image) as s:
        await wait_listening(s, HTTP_PORT)
        yield s


async def test_exec_returns_output_and_exit_code(stack: TunnelStack) -> None:
    out, err, code = await stack.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (out, err, code) == (b"out\n", b"err\n", 3)
    echoed, _, code = await stack.exec(["cat"], [b"abc", b"def\n"])
    assert (echoed, code) == (b"abcdef\n", 0)
    lines, _, code = await stack.exec(["sh", "-c", "echo a\n\techo b"])  # a script's lines
    assert (lines, code) == (b"a\nb\n", 0)
    out, err, code = await stack.exec(["no-such-program"])
    assert code not in (None, 0)
    assert b"no-such-program" in out + err


async def test_port_forward_fetches_from_httpd(stack: TunnelStack) -> None:
    request = b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n"
    reply = await forward(stack, HTTP_PORT, [request])
    assert reply.startswith(b"HTTP/1.")
    assert reply.endswith(INDEX)


async def forward(stack: TunnelStack, port: int, chunks: list[bytes]) -> bytes:
    requests = [
        T.PortForwardRequest(start=T.PortForwardStart(job_id=stack.job.job_id, port=port)),
        *(T.PortForwardRequest(data=c) for c in chunks),
        T.PortForwardRequest(close_write=True),
    ]
    call = stack.tunnels.PortForward(
        aiter_of(requests),  # type: ignore[arg-type]
        metadata=stack.plane.auth(stack.plane.consumer_key),
    )
    return b"".join([r.data async for r in call])


async def test_bad_ports_are_invalid_arguments(stack: TunnelStack) -> None:
    for port in (0, 70000):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await forward(stack, port, [])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "port" in (caught.value.details() or "")


async def test_another_tenant_cannot_exec(stack: TunnelStack) -> None:
    _, stranger = await new_tenant(stack.plane, "stranger", types_pb2.ROLE_CONSUMER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.exec(["true"], key=stranger)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_finished_job_is_failed_precondition(stack: TunnelStack, test_image: str) -> None:
    done = await stack.plane.submit(image=test_image, command=["true"], gpu_count=1)
    await stack.plane.wait_for(done.job_id, [types_pb2.JOB_STATE_SUCCEEDED], 60)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.exec(["true"], job_id=done.job_id)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "running" in (caught.value.details() or "")


async def open_exec(
    stack: TunnelStack, command: list[str], stop: asyncio.Event
) -> grpc.aio.StreamStreamCall[T.ExecRequest, T.ExecResponse]:
    start = T.ExecStart(job_id=stack.job.job_id, command=command, stdin=True)

    async def requests() -> AsyncIterator[T.ExecRequest]:
        yield T.ExecRequest(start=start)
        await stop.wait()

    return stack.tunnels.Exec(requests(), metadata=stack.plane.auth(stack.plane.consumer_key))


def the_pipe(stack: TunnelStack) -> Pipe:
    tunnels = stack.plane.plane.tunnels
    assert tunnels is not None
    pipes = list(tunnels.broker._pipes.values())
    assert len(pipes) == 1
    return pipes[0]


async def test_a_reader_that_stops_stalls_the_daemon_not_memory(stack: TunnelStack) -> None:
    """`cat /dev/zero` writes as fast as it can; the client reads a little, then nothing:
    the control plane takes no more frames from the daemon (which stops reading the exec),
    its memory stays flat, and the client going away closes the exec on the daemon."""
    stop = asyncio.Event()
    call = await open_exec(stack, ["cat", "/dev/zero"], stop)
    for _ in range(20):
        response = await call.read()
        assert isinstance(response, T.ExecResponse)
        assert response.stdout
    pipe = the_pipe(stack)
    await asyncio.sleep(1.0)  # windows and one-frame handoffs fill, then everything waits
    relayed, rss = pipe.relayed, peak_rss()
    await asyncio.sleep(2.0)
    assert pipe.relayed == relayed  # stalled: the daemon's writes wait on flow control
    assert peak_rss() - rss < 32 * 1024 * 1024
    # Bounded: what fits in the gRPC windows between, in frames of at most MAX_CHUNK (the
    # bytes, not frames × MAX_CHUNK: under load the daemon reads the exec in smaller pieces,
    # and 403 small frames once passed that bound with a few MB).
    assert 0 < pipe.relayed_bytes < 64 * 1024 * 1024

    call.cancel()
    stop.set()

    agent = stack.agent
    assert agent is not None

    def serving() -> bool:
        return any("Tunnels.serve" in repr(t.get_coro()) for t in agent._tasks)

    await until(lambda: not serving(), 20, "the client went away: the daemon closed the exec")
    tunnels = stack.plane.plane.tunnels
    assert tunnels is not None
    assert tunnels.broker.open_count == 0
    # And ended it (SIGHUP, HANGUP_GRACE after its input ended): Docker would have drained
    # `cat /dev/zero` until the container went.
    await until_gone(stack, "cat /dev/zero", 20)


async def processes(stack: TunnelStack) -> list[str]:
    """The container's processes' command lines (busybox ps), less the ps itself."""
    out, _, code = await stack.exec(["ps", "-o", "args"])
    assert code == 0
    return [line.strip() for line in out.decode().splitlines()[1:] if line.strip() != "ps -o args"]


async def until_gone(stack: TunnelStack, args: str, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while args in await processes(stack):
            await asyncio.sleep(0.2)


async def test_an_exec_whose_client_goes_away_is_hung_up_then_killed(stack: TunnelStack) -> None:
    """As after ssh: SIGHUP ends an interactive shell (tty) at once; a command without a
    terminal gets end-of-file, then SIGHUP after the grace (HANGUP_GRACE, 5 s), and when it
    ignores that, SIGKILL after another; what the shell started in a session of its own
    (setsid) survives."""
    stop = asyncio.Event()
    start = T.ExecStart(
        job_id=stack.job.job_id,
        command=["sh"],
        tty=True,
        stdin=True,
        size=T.TerminalSize(rows=24, cols=80),
    )
    typed = b"setsid sleep 301 & echo $((6*7))\n"

    async def requests() -> AsyncIterator[T.ExecRequest]:
        yield T.ExecRequest(start=start)
        yield T.ExecRequest(stdin=typed)
        await stop.wait()

    auth = stack.plane.auth(stack.plane.consumer_key)
    shell = stack.tunnels.Exec(requests(), metadata=auth)
    seen = b""
    async with asyncio.timeout(20):
        while b"42" not in seen:
            response = await shell.read()
            assert isinstance(response, T.ExecResponse)
            seen += response.stdout
    stubborn = await open_exec(
        stack, ["sh", "-c", "trap '' HUP; echo stubborn; while :; do sleep 1; done"], stop
    )
    response = await stubborn.read()
    assert isinstance(response, T.ExecResponse)
    assert response.stdout == b"stubborn\n"
    before = await processes(stack)
    assert "sh" in before
    assert any("while :" in p for p in before)
    shell.cancel()
    stubborn.cancel()
    stop.set()
    await until_gone(stack, "sh", 4.5)  # the interactive shell: hung up at once (< 5 s)
    assert any("while :" in p for p in await processes(stack))  # no terminal: still there
    async with asyncio.timeout(25):  # killed two graces later (it ignores SIGHUP)
        while any("while :" in p for p in await processes(stack)):
            await asyncio.sleep(0.2)
    assert "sleep 301" in await processes(stack)  # its own session: left running
    await stack.exec(["pkill", "-f", "sleep 301"])


async def test_the_daemons_call_breaking_is_unavailable(stack: TunnelStack) -> None:
    stop = asyncio.Event()
    call = await open_exec(stack, ["sh", "-c", "echo open; cat"], stop)
    response = await call.read()
    assert isinstance(response, T.ExecResponse)
    assert response.stdout == b"open\n"
    assert stack.agent is not None
    serving = [t for t in stack.agent._tasks if "Tunnels.serve" in repr(t.get_coro())]
    assert len(serving) == 1
    serving[0].cancel()  # as when the daemon dies: its call to the control plane breaks
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "daemon" in (caught.value.details() or "")
    stop.set()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_exec_into_a_session(stack: TunnelStack, test_image: str) -> None:
    """A session is a job of its own kind: exec reaches it by its `ses_` id. (Last here: it
    takes the daemon's second GPU.)"""
    sessions = sessions_pb2_grpc.SessionServiceStub(stack.plane.channel)
    auth = stack.plane.auth(stack.plane.consumer_key)
    spec = types_pb2.JobSpec(
        image=test_image,
        command=["sleep", "600"],
        gpu_count=1,
        max_price_per_gpu_hour_micro_credits=2_000_000,
        allow_simulated=True,
        allow_unverified=True,
    )
    created = await sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(spec=spec, duration_seconds=600), metadata=auth
    )
    session_id = created.session.session_id
    assert session_id.startswith("ses_")
    try:
        await stack.plane.wait_for(session_id, [types_pb2.JOB_STATE_RUNNING], 60)
        out, _, code = await stack.exec(["sh", "-c", "echo in a session"], job_id=session_id)
        assert (out, code) == (b"in a session\n", 0)
    finally:
        await sessions.DestroySession(
            sessions_pb2.DestroySessionRequest(session_id=session_id), metadata=auth
        )
