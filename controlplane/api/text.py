"""Every request's strings checked once for NUL and control characters (controlplane/strings.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message
from gpuplane.v1 import registry_pb2
from grpc import aio

from controlplane.api.interceptors import Continuation, Handler, _rewrap
from controlplane.strings import check_text


def _is_telemetry(message: Message) -> bool:
    """A telemetry batch on the Connect stream, the one message left unchecked: it is the
    hottest path (every host, every few seconds), and none of its strings is stored as given.
    A sample's `gpu_uuid` must name a GPU the host registered (else the sample is rejected),
    and a process's `job_id` only matches an attempt the host runs (its heartbeat, which is
    checked, says which); the samples are kept in memory and shown back only to the host's
    own provider and admins."""
    return (
        isinstance(message, registry_pb2.DaemonMessage) and message.WhichOneof("msg") == "telemetry"
    )


class TextInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Applies check_text to every request message, streamed ones included, before the
    handler sees it: a refused request reaches no service and stores nothing."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        streams_in = bool(handler.stream_unary or handler.stream_stream)

        def wrap(behaviour: Any, streams_out: bool) -> Any:
            async def checked(requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
                async for request in requests:
                    if not _is_telemetry(request):
                        check_text(request)
                    yield request

            if streams_out:

                async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                    if streams_in:
                        request = checked(request)
                    else:
                        check_text(request)
                    async for item in behaviour(request, context):
                        yield item

                return stream

            async def unary(request: Any, context: Any) -> Any:
                if streams_in:
                    request = checked(request)
                else:
                    check_text(request)
                return await behaviour(request, context)

            return unary

        return _rewrap(handler, wrap)
