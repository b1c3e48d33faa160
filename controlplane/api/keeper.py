"""The control plane's gRPC server, served again on the same ports when grpc.aio stops it by
itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc import aio

from controlplane.api.registration import GenericHandler, GenericHandlersOnly

log = logging.getLogger(__name__)

# How often the server is checked (a flag read: free); a restart follows within this.
CHECK_INTERVAL_SECONDS = 0.2
# How long stop() waits, beyond the grace, for a server that stopped by itself to close.
CLOSING_WAIT_SECONDS = 2.0


class KeptServer:
    """A grpc.aio server that is built again, with the same handlers, interceptors and options
    on the same ports, whenever it stops without being asked to.

    grpc.aio (1.85, the latest release) accepts every call in one task, and when that task
    fails it starts shutting the whole server down: its listeners close at once (connections
    are refused) and no new call is accepted, while nothing tells the application. Any client
    can make it fail: a request whose HTTP/2 `:path` is not UTF-8 raises UnicodeDecodeError
    there, before any handler or interceptor runs. (The shutdown itself then fails on the same
    error, so calls already in progress, the daemons' streams among them, go on being served.)

    So the server is checked every `check_interval` seconds and, once it no longer runs, a
    fresh one takes its ports: new calls are refused for at most about that long (a caller
    retries UNAVAILABLE, or waits for ready), with no restart of the process (the leadership,
    the caches and the open streams stay). `restarts` counts them and `failures` holds the
    error that stopped each; the stopped servers close at `stop()`, with the current one."""

    def __init__(
        self,
        interceptors: Sequence[aio.ServerInterceptor],  # type: ignore[type-arg]
        options: Sequence[tuple[str, Any]],
        *,
        on_restart: Callable[[], None] = lambda: None,
        check_interval: float = CHECK_INTERVAL_SECONDS,
    ) -> None:
        self._interceptors = list(interceptors)
        self._options = list(options)
        self._handlers: list[GenericHandler] = []
        self._ports: list[tuple[str, grpc.ServerCredentials | None]] = []
        self._on_restart = on_restart
        self._check_interval = check_interval
        self.server = self._new_server()
        self.failures: list[BaseException] = []  # why each restart's server stopped
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._stopped: list[aio.Server] = []  # stopped by themselves; their calls go on

    @property
    def restarts(self) -> int:
        return len(self.failures)

    def _new_server(self) -> aio.Server:
        server = aio.server(interceptors=self._interceptors, options=self._options)
        if self._handlers:
            server.add_generic_rpc_handlers(self._handlers)
        return server

    def registrar(self) -> aio.Server:
        """What the generated `add_*Servicer_to_server` functions are given: each service's
        generic handler goes on the server and is kept for the next one (GenericHandlersOnly:
        registered methods are dropped)."""
        return GenericHandlersOnly(self.server, self._handlers.extend).as_server()

    def add_port(self, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listens on `address` (TLS with `credentials`); returns the port (0 for a Unix
        socket). A port the system picked (":0") is kept by its number for the next server."""
        port = _bind(self.server, address, credentials)
        if not address.startswith("unix:") and address.rpartition(":")[2] == "0" and port:
            address = f"{address.rpartition(':')[0]}:{port}"
        self._ports.append((address, credentials))
        return port

    async def start(self) -> None:
        await self.server.start()
        self._watch = asyncio.create_task(self._keep(), name="grpc-server-keeper")

    async def stop(self, grace: float | None) -> None:
        """Stops the watch and the server (calls in progress get `grace` seconds), and the
        servers that stopped by themselves (their calls too, within CLOSING_WAIT_SECONDS)."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        stopping = [asyncio.create_task(self.server.stop(grace))]
        stopping += [asyncio.create_task(server.stop(grace)) for server in self._stopped]
        if len(stopping) > 1:  # a stopped server's last connections may be a hostile client's
            await asyncio.wait(stopping[1:], timeout=(grace or 0) + CLOSING_WAIT_SECONDS)
            for task in stopping[1:]:
                task.cancel()
        await stopping[0]
        self._stopped = []

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval)
            if self._stopping or _running(self.server):
                continue
            try:
                await self._restart()
            except Exception:  # the watch goes on: the next check tries again
                log.exception("serving gRPC again failed; the next check tries again")

    async def _restart(self) -> None:
        stopped = self.server
        self._stopped.append(stopped)
        try:
            await stopped.wait_for_termination(0)  # raises what stopped it, if grpc.aio knows
            failure: BaseException = RuntimeError("the gRPC server stopped (no error given)")
        except Exception as error:  # noqa: BLE001 - whatever failed grpc.aio's loop
            failure = error
        self.failures.append(failure)
        log.error(
            "grpc.aio stopped the gRPC server by itself (%s: %s); serving again on %s (restart %d)",
            type(failure).__name__,
            failure,
            ", ".join(address for address, _ in self._ports),
            self.restarts,
        )
        self._on_restart()
        delay = self._check_interval
        while not self._stopping:
            server = self._new_server()
            try:
                for address, credentials in self._ports:
                    if not _bind(server, address, credentials) and not address.startswith("unix:"):
                        raise RuntimeError(f"Failed to bind to address {address}")
            except RuntimeError as error:  # another process took the port meanwhile
                log.error("cannot serve gRPC again (%s); retrying in %.1fs", error, delay)
                await server.stop(None)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.server = server
            await server.start()
            return


def _bind(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def _running(server: aio.Server) -> bool:
    """Whether grpc.aio still serves (its Cython server's status; a server built otherwise
    is taken to run)."""
    inner = getattr(server, "_server", None)
    is_running = getattr(inner, "is_running", None)
    return True if is_running is None else bool(is_running())
