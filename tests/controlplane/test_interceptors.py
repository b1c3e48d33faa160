"""Error mapping: domain errors keep their code; a dependency that is down (object storage,
NATS) is UNAVAILABLE; unknown errors become a generic INTERNAL."""

from __future__ import annotations

import ast
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import nats.errors
import pytest
from gpuplane.v1 import admin_pb2, admin_pb2_grpc, jobs_pb2, jobs_pb2_grpc, types_pb2

from controlplane import errors
from controlplane.api.interceptors import ErrorInterceptor
from controlplane.errors import FailedPrecondition
from controlplane.metrics import Metrics
from storage.objects import StorageError


class Exploding(admin_pb2_grpc.AdminServiceServicer):
    async def WhoAmI(self, request: Any, context: Any) -> Any:
        raise RuntimeError("secret internals: db password hunter2")

    async def ListTenants(self, request: Any, context: Any) -> Any:
        raise FailedPrecondition("tenant is frozen")

    async def ListApiKeys(self, request: Any, context: Any) -> Any:
        raise StorageError("bucket 'b', 'k': SlowDown: try later")

    async def GetPricingPolicy(self, request: Any, context: Any) -> Any:
        raise nats.errors.NoServersError()


class ExplodingStream(jobs_pb2_grpc.JobServiceServicer):
    async def WatchJob(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield types_pb2.JobEvent(job_id="j", seq=1)
        raise KeyError("boom")


@pytest.fixture
async def server_address() -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor(Metrics())])
    admin_pb2_grpc.add_AdminServiceServicer_to_server(Exploding(), server)  # type: ignore[abstract]
    jobs_pb2_grpc.add_JobServiceServicer_to_server(ExplodingStream(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_unknown_error_is_generic_internal_and_logged(
    server_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with grpc.aio.insecure_channel(server_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin_pb2_grpc.AdminServiceStub(channel).WhoAmI(admin_pb2.WhoAmIRequest())
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert "hunter2" not in details
    assert "Traceback" not in details
    assert details.startswith("internal error (ref ")
    ref = details.removeprefix("internal error (ref ").rstrip(")")
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged
    assert logged[0].exc_info is not None


async def test_domain_error_keeps_its_code(server_address: str) -> None:
    async with grpc.aio.insecure_channel(server_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin_pb2_grpc.AdminServiceStub(channel).ListTenants(
                admin_pb2.ListTenantsRequest()
            )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == "tenant is frozen"


async def test_stream_error_after_items_is_internal(server_address: str) -> None:
    received: list[int] = []

    async def watch(channel: grpc.aio.Channel) -> None:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        async for event in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="j")):
            received.append(event.seq)

    async with grpc.aio.insecure_channel(server_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch(channel)
    assert received == [1]
    assert caught.value.code() == grpc.StatusCode.INTERNAL


async def test_storage_and_nats_failures_are_unavailable(server_address: str) -> None:
    async with grpc.aio.insecure_channel(server_address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as storage:
            await stub.ListApiKeys(admin_pb2.ListApiKeysRequest())
        with pytest.raises(grpc.aio.AioRpcError) as bus:
            await stub.GetPricingPolicy(admin_pb2.GetPricingPolicyRequest())
    assert storage.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (
        storage.value.details()
        == "object storage unavailable: bucket 'b', 'k': SlowDown: try later"
    )
    assert bus.value.code() == grpc.StatusCode.UNAVAILABLE
    assert bus.value.details() == "the message bus is not reachable; try again"


def test_domain_errors_know_no_transport() -> None:
    tree = ast.parse(inspect.getsource(errors))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "grpc" not in imported
