"""The gateway's transport: one HTTP/1.0 exchange with a replica over a raw byte stream into its
container (TunnelService.open_stream), the answer streamed to the caller as it arrives."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from controlplane.tunnels.service import TunnelService

CHUNK = 256 * 1024
# The replica's status line and headers: at most this many bytes.
MAX_HEAD = 64 * 1024
# Hop-by-hop headers of an answer: not passed on (RFC 9110 7.6.1); Content-Length is, as the
# response's length.
HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


class BadAnswer(Exception):
    """The replica's answer was not an HTTP response (it closed early, or spoke garbage)."""


class Answer(web.StreamResponse):
    """A replica's response: its head parsed (so a failure before it can still be retried
    elsewhere), its body copied from the replica's stream as aiohttp finishes the response,
    a chunk at a time, each write awaited (a slow caller slows the replica's stream, which
    its high-water marks hold back to the container). The stream closes when it is done."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        source: asyncio.StreamReader,
        stream: contextlib.AsyncExitStack,
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._source: asyncio.StreamReader | None = source
        self._stream = stream

    async def write_eof(self, data: bytes = b"") -> None:
        source, self._source = self._source, None
        try:
            if source is not None:
                while chunk := await source.read(CHUNK):
                    await self.write(chunk)
        finally:
            await self._stream.aclose()
        await super().write_eof(data)


def parse_head(head: bytes) -> tuple[int, dict[str, str], int | None]:
    """Status, the headers to pass on, and the Content-Length (if any) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or not status[0].startswith("HTTP/") or not status[1].isdigit():
        raise BadAnswer(f"not an HTTP status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        if key == "content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif key and key not in HOP:
            headers[name.strip()] = value.strip()
    return int(status[1]), headers, length


class Transport:
    """Exchanges with replicas over raw streams (no gRPC framing, no command per request:
    the replica's daemon keeps connections standing at this replica's data port)."""

    def __init__(self, tunnels: TunnelService) -> None:
        self.tunnels = tunnels

    async def exchange(self, job_id: str, port: int, raw: bytes) -> Answer:
        """Sends `raw` (a whole HTTP/1.0 request) to 127.0.0.1:port in the replica's
        container and reads the answer's head; the body follows as the Answer is written.
        Raises BadAnswer, a DomainError (the tunnel) or OSError before anything is sent to
        the caller, so the request can still go to another replica."""
        stream = contextlib.AsyncExitStack()
        try:
            reader, writer = await stream.enter_async_context(
                self.tunnels.open_stream(job_id, port)
            )
            writer.write(raw)
            writer.write_eof()
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                raise BadAnswer("no complete HTTP header") from None
            except asyncio.LimitOverrunError:
                raise BadAnswer("the HTTP header is too large") from None
            if len(head) > MAX_HEAD:
                raise BadAnswer(f"the HTTP header is larger than {MAX_HEAD} bytes")
            status, headers, length = parse_head(head[:-4])
        except BaseException as error:
            await stream.__aexit__(type(error), error, error.__traceback__)
            raise
        answer = Answer(status, headers, reader, stream)
        if length is not None:
            answer.content_length = length
        return answer
