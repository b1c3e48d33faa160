"""Servicers whose methods are not built yet: each answers UNIMPLEMENTED with a message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from controlplane.errors import Unimplemented
from gpuplane.v1 import jobs_pb2_grpc, ledger_pb2_grpc, registry_pb2_grpc


def _unary(service: str, method: str) -> Any:
    async def handler(self: Any, request: Any, context: Any) -> Any:
        raise Unimplemented(f"{service}.{method} is not built yet")

    return handler


def _stream(service: str, method: str) -> Any:
    async def handler(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
        raise Unimplemented(f"{service}.{method} is not built yet")
        yield  # an async generator, as grpc.aio expects of streaming methods

    return handler


def unbuilt(base: type, service: str, streaming: set[str]) -> type:
    """A subclass of generated servicer `base` answering UNIMPLEMENTED on every method."""
    methods = {
        name: (_stream if name in streaming else _unary)(service, name)
        for name in dir(base)
        if name[:1].isupper()
    }
    return type(f"Unbuilt{service}", (base,), methods)


UnbuiltJobService = unbuilt(
    jobs_pb2_grpc.JobServiceServicer, "JobService", {"WatchJob", "StreamLogs"}
)
UnbuiltRegistryService = unbuilt(
    registry_pb2_grpc.RegistryServiceServicer, "RegistryService", {"Connect"}
)
UnbuiltLedgerService = unbuilt(ledger_pb2_grpc.LedgerServiceServicer, "LedgerService", set())
