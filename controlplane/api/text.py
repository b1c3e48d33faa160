"""The one refusal of NUL and control characters in every string of every request."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc import aio

from controlplane.api.interceptors import Continuation, Handler, _rewrap
from controlplane.errors import InvalidArgument

# C0 controls, DEL and C1 controls. PostgreSQL's text cannot hold NUL at all, and the others
# corrupt terminals, logs and tables wherever the string is shown again.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The same without tab, newline and carriage return.
CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Fields whose values are multi-line text by nature (a container's command, arguments and
# environment: `sh -c` scripts, certificates): they may hold tab, newline and carriage return,
# never NUL or another control character. A map field counts for its values, not its keys.
MULTILINE_FIELDS = frozenset(
    {
        "gpuplane.v1.JobSpec.command",
        "gpuplane.v1.JobSpec.args",
        "gpuplane.v1.JobSpec.env",
    }
)


def _check(path: str, value: str, lines_allowed: bool) -> None:
    found = (CONTROL_BUT_LINES if lines_allowed else CONTROL).search(value)
    if found is not None:
        code = ord(found.group())
        what = "a NUL character" if code == 0 else f"control character U+{code:04X}"
        raise InvalidArgument(path, f"contains {what}; strings may not hold control characters")


def check_text(message: Message, prefix: str = "") -> None:
    """Raises InvalidArgument naming the first string field of `message` (at any depth, map
    keys and values included) that holds a NUL or control character."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        lines = field.full_name in MULTILINE_FIELDS
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            for key, item in value.items():
                shown = f"{path}[{key!r}]"
                if isinstance(key, str):
                    _check(shown, key, False)
                _one(shown, value_field, item, lines)
        elif field.is_repeated:
            for i, item in enumerate(value):
                _one(f"{path}[{i}]", field, item, lines)
        else:
            _one(path, field, value, lines)


def _one(path: str, field: FieldDescriptor, value: Any, lines: bool) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        _check(path, value, lines)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        check_text(value, f"{path}.")


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
