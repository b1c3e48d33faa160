"""The fleet figures' floor server: RegisterHost and Connect answered with fixed replies."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from gpuplane.v1 import registry_pb2
from grpc import aio

SERVICE = "gpuplane.v1.RegistryService"
REGISTERED = registry_pb2.RegisterHostResponse(
    host_id="host_floor", host_credential="gph_floor"
).SerializeToString()
HELLO_ACK = registry_pb2.ControlMessage(
    hello_ack=registry_pb2.HelloAck(host_id="host_floor")
).SerializeToString()


async def _register(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    return REGISTERED


async def _connect(
    requests: AsyncIterator[bytes], context: aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    """Answers the hello, then reads (heartbeats, telemetry) until the host goes."""
    async for _ in requests:
        yield HELLO_ACK
        break
    async for _ in requests:
        pass


def registry_handlers() -> grpc.GenericRpcHandler[bytes, bytes]:
    """RegisterHost and Connect on raw bytes (no (de)serializers)."""
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "RegisterHost": grpc.unary_unary_rpc_method_handler(_register),
            "Connect": grpc.stream_stream_rpc_method_handler(_connect),
        },
    )
