"""Every request's strings checked once for NUL and control characters (controlplane/strings.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.message import Message
from gpuplane.v1 import registry_pb2

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


def check_request(request: Message) -> Message:
    """The request, once check_text found nothing in it (else InvalidArgument)."""
    check_text(request)
    return request


async def checked_stream(requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
    """A client stream's messages, each checked before the handler sees it (telemetry
    batches excepted)."""
    async for request in requests:
        if not _is_telemetry(request):
            check_text(request)
        yield request
