"""Exec and port-forward through the control plane and a real daemon into a busybox container
(network none): output and exit codes, HTTP through a port-forward, errors, faults."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from gpuplane.v1 import tunnels_pb2, types_pb2

from devstack import DockerEngine, NatsServer, S3Server
from devstack.factories import new_tenant
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
