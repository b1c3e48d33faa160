"""A browser as the tests drive it: an aiohttp client on the dashboard's port that logs in,
keeps the session cookie and makes gRPC-Web calls, decoding frames and trailers."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import grpc
from google.protobuf.message import Message

from tests.harness import JobPlane

M = TypeVar("M", bound=Message)
GRPC_WEB = "application/grpc-web+proto"
OK = 0


def dashboard_url(plane: JobPlane) -> str:
    return f"http://127.0.0.1:{plane.plane.dashboard_port}"


def frame(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


@dataclass
class Reply:
    """One gRPC-Web call's answer: HTTP status and headers, messages, the gRPC status."""

    http_status: int
    headers: dict[str, str]
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)
    # Read up to its first message only (call(first_only=True)): OK so far, no status yet.
    cut: bool = False

    @property
    def code(self) -> int:
        status = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        if status is None and self.cut:
            return OK
        assert status is not None, f"no grpc-status (HTTP {self.http_status}, {self.headers})"
        return int(status)

    @property
    def message(self) -> str:
        raw = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return urllib.parse.unquote(raw)

    def decoded(self, kind: type[M]) -> list[M]:
        return [kind.FromString(m) for m in self.messages]


def parse_trailers(payload: bytes) -> dict[str, str]:
    lines = payload.decode("ascii").split("\r\n")
    pairs = [line.split(":", 1) for line in lines if line]
    return {k.strip().lower(): v.strip() for k, v in pairs}


class Browser:
    """A logged-in (or not) browser on one dashboard; `async with Browser(url) as b`."""

    def __init__(
        self,
        base_url: str,
        origin: str | None = None,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        self.base_url = base_url
        self.origin = origin if origin is not None else base_url
        # unsafe: cookies for an IP address host (127.0.0.1), as browsers keep them.
        self.http = aiohttp.ClientSession(
            base_url, cookie_jar=aiohttp.CookieJar(unsafe=True), connector=connector
        )
        self.logged_in = False

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Origin": self.origin, **extra}

    async def login(self, api_key: str | None) -> tuple[int, dict[str, Any], str]:
        """(HTTP status, JSON body, the Set-Cookie header)."""
        async with self.http.post(
            "/auth/login",
            json={"api_key": api_key},
            headers=self.headers(**{"x-gpuplane-csrf": "1"}),
        ) as response:
            self.logged_in = response.status == 200
            return (
                response.status,
                await response.json(),
                response.headers.get("Set-Cookie", ""),
            )

    async def logout(self) -> int:
        async with self.http.post(
            "/auth/logout", headers=self.headers(**{"x-gpuplane-csrf": "1"})
        ) as response:
            return response.status

    async def call(
        self,
        method: str,
        request: Message,
        *,
        first_only: bool = False,
        on_message: Callable[[bytes], Awaitable[None]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """POST /gpuplane.v1.<method> as connect-web's gRPC-Web transport does; with
        `first_only`, stops reading after the first message (a stream that goes on);
        `on_message` is awaited on each message as it arrives."""
        sent = {"Content-Type": GRPC_WEB, "x-grpc-web": "1", **self.headers(), **(headers or {})}
        async with self.http.post(
            f"/gpuplane.v1.{method}", data=frame(request.SerializeToString()), headers=sent
        ) as response:
            reply = Reply(response.status, dict(response.headers))
            if response.status != 200:
                return reply
            while True:
                try:
                    head = await response.content.readexactly(5)
                except aiohttp.ClientPayloadError:
                    break
                except EOFError:  # asyncio.IncompleteReadError: the body ended
                    break
                payload = await response.content.readexactly(int.from_bytes(head[1:], "big"))
                if head[0] & 0x80:
                    reply.trailers = parse_trailers(payload)
                    break
                reply.messages.append(payload)
                if on_message is not None:
                    await on_message(payload)
                if first_only:
                    reply.cut = True
                    break
            return reply


@asynccontextmanager
async def logged_in(
    base_url: str, keys: Mapping[str, str | None]
) -> AsyncIterator[dict[str, Browser]]:
    """A browser per name, logged in with its key (none: not logged in; a key the login
    refuses leaves that browser without a session)."""
    async with AsyncExitStack() as stack:
        browsers = {}
        for name, key in keys.items():
            browsers[name] = await stack.enter_async_context(Browser(base_url))
            if key is not None:
                await browsers[name].login(key)
        yield browsers


# Answers that say the call was stopped by authorisation (or cannot be made at all).
REFUSALS = {
    code.value[0]: code.name
    for code in (
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
    )
}


def browser_cell(reply: Reply, what: str) -> str:
    """The authorisation matrix's cell of a gRPC-Web reply: the refusal's code name, or
    "allowed" (with the code when not OK) for a call that got past authorisation."""
    assert reply.http_status == 200, f"{what}: HTTP {reply.http_status}"
    code = reply.code
    if code in REFUSALS:
        return REFUSALS[code]
    assert code not in (grpc.StatusCode.INTERNAL.value[0], grpc.StatusCode.UNKNOWN.value[0]), (
        f"{what}: {code} {reply.message}"
    )
    return "allowed" if code == OK else f"allowed ({code}: {reply.message})"
