"""gRPC-Web to the control plane's own gRPC server: each call forwarded as bytes, like Envoy's
grpc_web filter, so every interceptor (auth, rate limits, string checks, errors, metrics)
runs exactly as for a gRPC client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import grpc
from aiohttp import web
from google.protobuf import descriptor_pool
from grpc import aio

from controlplane.api.interceptors import BROWSER_SESSION_SCHEME

log = logging.getLogger(__name__)

CONTENT_TYPES = frozenset({"application/grpc-web+proto", "application/grpc-web"})
DATA_FLAG = 0x00
TRAILER_FLAG = 0x80
HEADER_BYTES = 5
CODES = {code.value[0]: code for code in grpc.StatusCode}
# grpc-timeout units (the gRPC over HTTP/2 spec) in seconds.
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


class BadRequest(Exception):
    """A request body that is not one uncompressed gRPC-Web message."""


def method_kinds(services: Iterable[str]) -> dict[str, tuple[bool, bool]]:
    """ "/package.Service/Method" → (client streaming, server streaming), of every method of
    the services named (those the gRPC server serves)."""
    pool = descriptor_pool.Default()
    return {
        f"/{name}/{method.name}": (method.client_streaming, method.server_streaming)
        for name in services
        for method in pool.FindServiceByName(name).methods
    }


def frame(flag: int, payload: bytes) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def percent_encode(text: str) -> str:
    """grpc-message's encoding: UTF-8, bytes outside printable ASCII and '%' as %XX."""
    return "".join(
        chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}" for b in text.encode()
    )


def trailer_frame(code: grpc.StatusCode, message: str) -> bytes:
    """The final frame: the status as HTTP/1 header lines (the gRPC-Web spec)."""
    lines = f"grpc-status:{code.value[0]}\r\ngrpc-message:{percent_encode(message)}\r\n"
    return frame(TRAILER_FLAG, lines.encode("ascii"))


def parse_request(body: bytes, limit: int) -> bytes:
    """The one message of a unary or server-streaming call's request body."""
    if len(body) < HEADER_BYTES:
        raise BadRequest("the body holds no gRPC-Web frame")
    flag, size = body[0], int.from_bytes(body[1:HEADER_BYTES], "big")
    if flag != DATA_FLAG:
        raise BadRequest("compressed or trailer frames are not accepted in a request")
    if size > limit:
        raise BadRequest(f"the message is larger than {limit} bytes")
    if len(body) != HEADER_BYTES + size:
        raise BadRequest("the body must hold exactly one message frame")
    return body[HEADER_BYTES:]


def parse_timeout(value: str | None) -> float | None:
    """A grpc-timeout header ("10S", "250m") in seconds; None when absent or malformed."""
    if not value or value[-1] not in TIMEOUT_UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * TIMEOUT_UNITS[value[-1]]


def trailers_only(content_type: str, code: grpc.StatusCode, message: str) -> web.Response:
    """A call that ended before any message: the status in the headers and in a trailer
    frame, so clients reading either find it."""
    return web.Response(
        status=200,
        body=trailer_frame(code, message),
        headers={
            "Content-Type": content_type,
            "grpc-status": str(code.value[0]),
            "grpc-message": percent_encode(message),
        },
    )


def _status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, aio.AioRpcError):
        return error.code(), error.details() or ""
    return grpc.StatusCode.UNAVAILABLE, "the control plane is shutting down: reconnect"


class GrpcWebProxy:
    """Forwards gRPC-Web calls to `target` (the control plane's own gRPC server) with the
    browser session's token as the call's credential. Client-streaming methods answer
    UNIMPLEMENTED: a browser cannot stream a request."""

    def __init__(self, target: str, services: Iterable[str], max_message_bytes: int) -> None:
        self.kinds = method_kinds(services)
        self.max_message_bytes = max_message_bytes
        self.channel = aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self._calls: set[aio.Call] = set()
        self.closing = False

    async def handle(self, request: web.Request, token: str | None) -> web.StreamResponse:
        content_type = request.content_type
        if content_type not in CONTENT_TYPES:
            raise web.HTTPUnsupportedMediaType(
                text="gRPC-Web requests are application/grpc-web+proto"
            )
        path = request.path
        kind = self.kinds.get(path)
        if kind is None:
            return trailers_only(content_type, grpc.StatusCode.UNIMPLEMENTED, f"no method {path}")
        if kind[0]:
            message = f"{path} streams its requests, which a browser cannot: call it over gRPC"
            return trailers_only(content_type, grpc.StatusCode.UNIMPLEMENTED, message)
        try:
            body = parse_request(await request.read(), self.max_message_bytes)
        except BadRequest as bad:
            return trailers_only(content_type, grpc.StatusCode.INVALID_ARGUMENT, str(bad))
        if self.closing:
            code, message = _status(asyncio.CancelledError())
            return trailers_only(content_type, code, message)
        metadata = aio.Metadata()
        if token:
            metadata.add("authorization", f"{BROWSER_SESSION_SCHEME} {token}")
        timeout = parse_timeout(request.headers.get("grpc-timeout"))
        call: aio.UnaryUnaryCall[bytes, bytes] | aio.UnaryStreamCall[bytes, bytes]
        if kind[1]:
            call = self.channel.unary_stream(path, None, None)(
                body, metadata=metadata, timeout=timeout
            )
        else:
            call = self.channel.unary_unary(path, None, None)(
                body, metadata=metadata, timeout=timeout
            )
        self._calls.add(call)
        try:
            return await self._relay(request, call, content_type)
        finally:
            self._calls.discard(call)
            call.cancel()

    async def _relay(
        self,
        request: web.Request,
        call: aio.UnaryUnaryCall[bytes, bytes] | aio.UnaryStreamCall[bytes, bytes],
        content_type: str,
    ) -> web.StreamResponse:
        """The call's messages as data frames as they come, then its status as a trailer."""
        try:
            first = await self._next(call)
        except (aio.AioRpcError, asyncio.CancelledError) as error:
            if not self._ours(error):
                raise
            return trailers_only(content_type, *_status(error))
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        await response.prepare(request)
        code, details = grpc.StatusCode.OK, ""
        try:
            item = first
            while item is not None:
                await response.write(frame(DATA_FLAG, item))
                item = await self._next(call) if isinstance(call, aio.UnaryStreamCall) else None
        except (aio.AioRpcError, asyncio.CancelledError) as error:
            if not self._ours(error):
                raise
            code, details = _status(error)
        await response.write(trailer_frame(code, details))
        await response.write_eof()
        return response

    def _ours(self, error: BaseException) -> bool:
        """An RPC error, or the cancellation close() made (not this handler's own)."""
        return isinstance(error, aio.AioRpcError) or self.closing

    @staticmethod
    async def _next(
        call: aio.UnaryUnaryCall[bytes, bytes] | aio.UnaryStreamCall[bytes, bytes],
    ) -> bytes | None:
        """The call's next message; None at its (successful) end."""
        if isinstance(call, aio.UnaryStreamCall):
            item = await call.read()
            return item if isinstance(item, bytes) else None  # grpc.aio.EOF at the end
        return bytes(await call)

    async def close(self) -> None:
        """Ends the calls in flight (their browsers get UNAVAILABLE and reconnect)."""
        self.closing = True
        for call in list(self._calls):
            call.cancel()
        await self.channel.close(None)
