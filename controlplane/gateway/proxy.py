"""The services gateway: HTTP to /s/NAME/… reaches a ready replica through its daemon's tunnel."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from controlplane.auth.principal import Principal
from controlplane.auth.service import AuthService
from controlplane.errors import DomainError
from controlplane.gateway.balancer import Choice, ServicePool, Strategy
from controlplane.gateway.callers import Caller, Callers
from controlplane.gateway.routes import Route, RouteTable
from controlplane.gateway.transport import BadAnswer, Transport
from controlplane.services.service import ServiceService
from controlplane.tunnels.service import TunnelService

log = logging.getLogger(__name__)
MAX_RESPONSE = 64 * 1024 * 1024
# Methods retried on another replica when the first one failed (RFC 9110's idempotent ones).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# Hop-by-hop headers: not forwarded either way (RFC 9110 7.6.1), nor lengths the proxy sets.
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
        "authorization",
        "host",
    }
)


def request_bytes(request: web.Request, path: str, body: bytes) -> bytes:
    """The request as HTTP/1.0 to the replica (so it answers without chunking and closes)."""
    lines = [f"{request.method} {path} HTTP/1.0", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in HOP]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


class Gateway:
    """Routes `/s/NAME/PATH` of a caller (its API key as `Authorization: Bearer KEY`) to a
    ready replica of the caller's service NAME (another tenant's is 404, as a missing one),
    round-robin, each replica behind its circuit breaker; an idempotent request that failed
    on one replica is tried once on another; 503 with the reason when none can take it. The
    bytes go over a raw stream into the replica's container (gateway/transport.py: through
    its daemon's outbound connections, so its host needs no inbound port)."""

    def __init__(
        self,
        services: ServiceService,
        tunnels: TunnelService,
        auth: AuthService,
        registry: CollectorRegistry | None = None,
        routes: RouteTable | None = None,
    ) -> None:
        self.services = services
        self.tunnels = tunnels
        self.transport = Transport(tunnels)
        self.auth = auth
        # Kept by a RouteWatcher from the control plane's change stream; read per request.
        self.routes = routes if routes is not None else RouteTable()
        self.callers = Callers(auth, self.routes)
        self.strategy = Strategy(services.settings.gateway_balance)
        self.pools: dict[str, ServicePool] = {}
        # The route each pool's replicas were last taken from.
        self._pooled: dict[str, Route] = {}
        self.port = 0
        self.requests = Counter(
            "gpuplane_gateway_requests_total",
            "Requests the gateway answered, by service id, replica (- when none) and status.",
            ["service", "replica", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "gpuplane_gateway_request_seconds",
            "Time from a request's arrival to its answer, by service id.",
            ["service"],
            registry=registry,
        )
        self.failures = Counter(
            "gpuplane_gateway_replica_failures_total",
            "Requests a replica failed (the tunnel refused or broke, not an HTTP answer).",
            ["service", "replica"],
            registry=registry,
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_RESPONSE)
        app.router.add_route("*", "/s/{name}/{tail:.*}", self.handle)
        app.router.add_route("*", "/s/{name}", self.handle)
        return app

    async def serve(self, address: str) -> None:
        """Serves on `address` (host:port; port 0 picks one, then `port`) until cancelled."""
        host, _, port = address.rpartition(":")
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host or "127.0.0.1", int(port))
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            log.info("gateway listening on %s:%d", host, self.port)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        caller = await self._caller(request)
        if caller is None:
            return web.Response(
                status=401, text="a key is needed: Authorization: Bearer API-KEY or CALLER-KEY"
            )
        name = request.match_info["name"]
        route = caller.route(self.routes, name)
        if route is None:
            return web.Response(status=404, text=f"no service {name!r}")
        if not route.active:
            return web.Response(status=503, text=f"service unavailable: {name!r} is stopped")
        pool = self._pool(route)
        path = "/" + request.match_info.get("tail", "")
        if request.query_string:
            path += "?" + request.query_string
        raw = request_bytes(request, path, await request.read())
        started = time.monotonic()
        response = await self._route(caller.principal, pool, request.method, raw, route.port)
        sid = route.service_id
        replica = response.headers.get("X-Gpuplane-Replica", "-")
        self.requests.labels(sid, replica, str(response.status)).inc()
        self.seconds.labels(sid).observe(time.monotonic() - started)
        return response

    def _pool(self, route: Route) -> ServicePool:
        """The service's pool, its replicas those of `route` (kept while the route is)."""
        pool = self.pools.get(route.service_id)
        if pool is None:
            if len(self.pools) >= 2 * len(self.routes) + 100:  # deleted services' pools go
                gone = [sid for sid in self.pools if self.routes.get(sid) is None]
                for sid in gone:
                    del self.pools[sid], self._pooled[sid]
            pool = self.pools[route.service_id] = ServicePool(
                strategy=self.strategy, service_id=route.service_id
            )
        if self._pooled.get(route.service_id) is not route:
            pool.update(route.replica_ids)
            self._pooled[route.service_id] = route
        return pool

    async def _route(
        self, principal: Principal, pool: ServicePool, method: str, raw: bytes, port: int
    ) -> web.StreamResponse:
        tried: set[str] = set()
        why = ""
        for _ in range(2 if method in IDEMPOTENT else 1):
            choice: Choice = pool.choose(avoid=tried)
            if choice.replica is None:
                why = why or choice.reason
                break
            replica = choice.replica
            tried.add(replica.replica_id)
            try:
                response = await self.transport.exchange(replica.replica_id, port, raw)
            except (DomainError, BadAnswer, OSError) as error:
                pool.release(replica, ok=False)
                self.failures.labels(pool.service_id, replica.replica_id).inc()
                why = f"replica {replica.replica_id}: {getattr(error, 'message', error)}"
                log.warning("gateway: %s", why)
                continue
            pool.release(replica, ok=True)
            response.headers["X-Gpuplane-Replica"] = replica.replica_id
            return response
        return web.Response(status=503, text=f"service unavailable: {why}")

    async def _caller(self, request: web.Request) -> Caller | None:
        header = request.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            return None
        return await self.callers.identify(secret.strip())
