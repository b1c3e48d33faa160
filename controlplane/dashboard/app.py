"""The dashboard's HTTP server (aiohttp, on the control plane's event loop): the built app's
static files, browser login, and gRPC-Web on the same origin; security headers and CSRF
checks on everything."""

from __future__ import annotations

import logging
import shutil
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from aiohttp import web

from controlplane.api.interceptors import RateLimiter
from controlplane.auth.browser_sessions import BrowserSessions
from controlplane.dashboard.grpcweb import GrpcWebProxy
from controlplane.dashboard.login import LoginRoutes, session_token
from controlplane.dashboard.settings import DashboardSettings
from controlplane.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# A Vite build loads only its own scripts and styles; 'unsafe-inline' styles let components
# set style attributes (charts), never scripts. Result downloads are links to the object
# store (navigations, which default-src does not govern).
CSP = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Vite names every built asset by its content's hash: cached for good; the rest revalidated.
IMMUTABLE = "public, max-age=31536000, immutable"
# Never the app's routes (no index.html for them): a mistyped API call fails plainly.
API_PATHS = ("auth/", "gpuplane.v1.")
NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gpuplane: dashboard not built</title></head>
<body><h1>The dashboard is not built</h1>
<p>Run <code>scripts/bootstrap</code> in the checkout (it builds <code>web/</code> into
<code>web/dist</code>), or point <code>GPUPLANE_DASHBOARD_DIR</code> at a built app.
The API (login and gRPC-Web) works without it.</p></body></html>
"""


def own_origins(request: web.Request) -> set[str]:
    """This server's origin as the browser names it: its scheme, or the one a TLS-terminating
    proxy says it served (X-Forwarded-Proto: a cross-site page cannot set that header), and
    the Host the browser asked for."""
    schemes = {request.scheme, request.headers.get("X-Forwarded-Proto", request.scheme)}
    return {f"{scheme}://{request.host}" for scheme in schemes}


def csrf_refusal(request: web.Request) -> str | None:
    """Why a state-changing request is refused as cross-site, if it is: a foreign Origin, or
    a missing custom header (a cross-site form cannot set one; a cross-site script cannot
    without a CORS preflight, which is never granted)."""
    origin = request.headers.get("Origin")
    if origin is not None and origin not in own_origins(request):
        return "cross-origin request refused"
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        return "cross-site request refused"
    if request.path.startswith("/auth/"):
        if request.headers.get("x-gpuplane-csrf") != "1":
            return "missing header x-gpuplane-csrf: 1"
    elif request.headers.get("x-grpc-web") != "1":
        return "missing header x-grpc-web: 1"
    return None


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CSRF checks on every POST; security and cache headers on every answer."""
    if request.method == "POST":
        refusal = csrf_refusal(request)
        if refusal is not None:
            return web.json_response({"error": refusal}, status=403, headers=SECURITY_HEADERS)
    try:
        response = await handler(request)
    except web.HTTPException as http_error:
        http_error.headers.update(SECURITY_HEADERS)
        raise
    response.headers.update(SECURITY_HEADERS)
    if request.method == "POST" or request.path.startswith("/auth/"):
        response.headers["Cache-Control"] = "no-store"
    return response


class StaticApp:
    """The built single-page app: its files, and index.html for any other path without a
    file extension (the app's own routes)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    async def serve(self, request: web.Request) -> web.StreamResponse:
        relative = request.match_info.get("tail", "")
        if relative.startswith(API_PATHS):
            raise web.HTTPNotFound(text=f"no page /{relative}")
        candidate = (self.root / relative).resolve()
        if relative and candidate.is_relative_to(self.root) and candidate.is_file():
            cache = IMMUTABLE if relative.startswith("assets/") else "no-cache"
            return web.FileResponse(candidate, headers={"Cache-Control": cache})
        if "." in relative.rsplit("/", 1)[-1]:
            raise web.HTTPNotFound(text=f"no file /{relative}")
        index = self.root / "index.html"
        if not index.is_file():
            log.warning("the dashboard is not built: no %s", index)
            return web.Response(status=500, text=NOT_BUILT, content_type="text/html")
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})


class Dashboard:
    """The dashboard's server: `await start()` returns the bound port; `await stop()`."""

    def __init__(
        self,
        settings: DashboardSettings,
        browser_sessions: BrowserSessions,
        limiter: RateLimiter,
        grpc_target: str,
        services: Iterable[str],
        max_message_bytes: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.proxy = GrpcWebProxy(grpc_target, services, max_message_bytes)
        self.login = LoginRoutes(
            browser_sessions, limiter, secure=tls is not None, max_age=settings.session_max_seconds
        )
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.private_dir: Path | None = None  # loopback()'s, removed at stop

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[guard], client_max_size=self.proxy.max_message_bytes + 1024
        )
        self.login.add_to(app)
        app.router.add_post("/{service:gpuplane\\.v1\\.[A-Za-z0-9]+}/{method}", self.grpc_web)
        app.router.add_get("/{tail:.*}", StaticApp(self.settings.app_dir).serve)
        return app

    async def grpc_web(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.handle(request, session_token(request))

    async def start(self) -> int:
        host, _, port = self.settings.address.rpartition(":")
        # handler_cancellation: a browser that goes away ends its stream's gRPC call at once.
        self.runner = runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]") or None, int(port or 0), ssl_context=self.tls)
        try:
            await site.start()
        except OSError as error:
            await runner.cleanup()
            raise OSError(
                f"dashboard: cannot listen on {self.settings.address}: {error.strerror}"
            ) from error
        self.port = int(runner.addresses[0][1])
        scheme = "https" if self.tls else "http"
        log.info("dashboard serving on %s://%s:%d/", scheme, host or "0.0.0.0", self.port)
        return self.port

    async def stop(self) -> None:
        """Ends the streams in flight (UNAVAILABLE: the pages reconnect), then the server."""
        await self.proxy.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """The dashboard's TLS: the gRPC API's certificate when one is set (browsers present no
    client certificate, so none is asked for here)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def loopback(add_port: Callable[[str], int]) -> tuple[str, Path]:
    """A plaintext gRPC port on a Unix socket in a fresh private directory (mode 0700), for the
    gRPC-Web proxy alone: the TCP port may require client certificates, which a browser has
    not. Returns its target and the directory (removed by Dashboard.stop)."""
    directory = Path(tempfile.mkdtemp(prefix="gpuplane-web-"))
    target = f"unix:{directory / 'grpc.sock'}"
    add_port(target)
    return target, directory


def build(
    settings: Settings,
    browser_sessions: BrowserSessions,
    add_port: Callable[[str], int],
    services: Iterable[str],
) -> Dashboard:
    """The dashboard of a control plane, from its settings, fronting the gRPC server whose
    `add_port` it is given (not started yet: it gains the proxy's private port, see
    loopback)."""
    limits = settings.auth
    target, directory = loopback(add_port)
    dashboard = Dashboard(
        settings.dashboard,
        browser_sessions,
        RateLimiter(limits.rate_limit_per_second, limits.rate_limit_burst),
        target,
        services,
        settings.serving.max_message_bytes,
        server_tls(settings),
    )
    dashboard.private_dir = directory
    return dashboard
