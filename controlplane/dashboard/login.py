"""Browser login: an API key exchanged for an HttpOnly session cookie; logout; who am I."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from controlplane.api.interceptors import RateLimiter
from controlplane.auth.browser_sessions import INVALID_KEY, BrowserSessions
from controlplane.auth.principal import Principal
from controlplane.errors import Unauthenticated

COOKIE = "gpuplane_session"


def session_token(request: web.Request) -> str | None:
    """The browser's session token, from its cookie (the only credential the browser API
    takes: an Authorization header a page script sets is ignored)."""
    token = request.cookies.get(COOKIE, "")
    return token or None


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def who(principal: Principal) -> dict[str, str]:
    """What WhoAmI says of a principal, as the login and session answers carry it."""
    return {
        "tenant_id": principal.tenant_id,
        "role": principal.role.value,
        "key_id": principal.principal_id,
    }


class LoginRoutes:
    """POST /auth/login, POST /auth/logout, GET /auth/session. Login attempts are limited per
    client address by the same token bucket (GPUPLANE_RATE_LIMIT_*) as each key's calls."""

    def __init__(
        self,
        browser_sessions: BrowserSessions,
        limiter: RateLimiter,
        secure: bool,
        max_age: float,
    ) -> None:
        self.browser_sessions = browser_sessions
        self.limiter = limiter
        self.secure = secure
        self.max_age = max_age

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/auth/login", self.login)
        app.router.add_post("/auth/logout", self.logout)
        app.router.add_get("/auth/session", self.session)

    def is_tls(self, request: web.Request) -> bool:
        """Served over TLS: by this server, or by a proxy in front that says so."""
        return self.secure or request.headers.get("X-Forwarded-Proto") == "https"

    async def login(self, request: web.Request) -> web.Response:
        if not self.limiter.allow(f"login:{request.remote}"):
            return error(429, "too many login attempts from this address: retry later")
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        api_key = body.get("api_key") if isinstance(body, dict) else None
        if not isinstance(api_key, str) or not api_key.strip():
            return error(400, 'api_key: required (send JSON {"api_key": "gpk_..."})')
        try:
            login = await self.browser_sessions.login(api_key.strip())
        except Unauthenticated:
            return error(401, INVALID_KEY)
        response = web.json_response(who(login.principal))
        response.set_cookie(
            COOKIE,
            login.token,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=self.is_tls(request),
            max_age=int(self.max_age),
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        token = session_token(request)
        if token is not None:
            await self.browser_sessions.logout(token)
        response = web.Response(status=204)
        response.del_cookie(COOKIE, path="/", secure=self.is_tls(request), samesite="Strict")
        return response

    async def session(self, request: web.Request) -> web.Response:
        token = session_token(request)
        try:
            if token is None:
                raise Unauthenticated("no session")
            principal = await self.browser_sessions.authenticate(token)
        except Unauthenticated:
            return error(401, "not logged in")
        return web.json_response(who(principal))
