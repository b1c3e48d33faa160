"""The server's one interceptor (`Gate`): error mapping with RPC metrics, bearer-key
authentication, per-key rate limits, the role policy and the request text check, applied by
one wrapper built once per method."""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from controlplane.api.status import dependency_down, status_code_for
from controlplane.api.text import check_request, checked_stream
from controlplane.auth.policy import PUBLIC_METHODS, allowed_roles
from controlplane.auth.principal import Principal, Role, set_current_principal
from controlplane.errors import DomainError, PermissionDenied, ResourceExhausted, Unauthenticated
from controlplane.metrics import Metrics

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]
# Wraps one behaviour (unary or streaming) of a handler into another.
Wrap = Callable[[Any, bool], Any]


def _rewrap(handler: Handler, wrap: Wrap) -> Handler:
    """The same handler with its behaviour passed through `wrap(behaviour, streams_out)`."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def rpc_type(handler: Handler) -> str:
    """go-grpc-prometheus's grpc_type of a handler."""
    if handler.unary_unary:
        return "unary"
    if handler.unary_stream:
        return "server_stream"
    return "client_stream" if handler.stream_unary else "bidi_stream"


def split_method(method: str) -> tuple[str, str]:
    """ "/gpuplane.v1.AdminService/WhoAmI" → ("gpuplane.v1.AdminService", "WhoAmI")."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def aborted_code(context: aio.ServicerContext[Any, Any]) -> str:
    """The status a handler aborted with itself (context.abort)."""
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class _RpcCall:
    """One method's metrics (go-grpc-prometheus's labels) and its error answers; the labelled
    series are looked up once per method, not per call."""

    def __init__(self, metrics: Metrics, method: str, kind: str) -> None:
        self.method = method
        self.labels = (kind, *split_method(method))
        self.started = metrics.rpcs_started.labels(*self.labels)
        self.rpcs = metrics.rpcs
        self.ended: dict[str, Any] = {}
        # Streams stay open for hours: their durations go to a histogram of their own.
        durations = metrics.rpc_seconds if kind == "unary" else metrics.stream_seconds
        self.durations = durations.labels(*self.labels)

    def start(self) -> float:
        """One RPC started: counted; returns when (perf_counter)."""
        self.started.inc()
        return time.perf_counter()

    def done(self, code: str, started: float) -> None:
        """One RPC ended with `code`, whichever: counted and timed."""
        ended = self.ended.get(code)
        if ended is None:
            ended = self.ended[code] = self.rpcs.labels(*self.labels, code)
        ended.inc()
        self.durations.observe(time.perf_counter() - started)

    async def fail(
        self, context: aio.ServicerContext[Any, Any], error: BaseException, started: float
    ) -> None:
        method = self.method
        if isinstance(error, DomainError):
            code = status_code_for(error)
            self.done(code.name, started)
            await context.abort(code, error.message)
        down = dependency_down(error)
        if down is not None:
            log.warning(
                "%s: the %s is unavailable: %s", method, down.dependency, type(error).__name__
            )
            self.done("UNAVAILABLE", started)
            await context.abort(grpc.StatusCode.UNAVAILABLE, down.message)
        ref = secrets.token_hex(4)
        log.error("unhandled error in %s (ref %s)", method, ref, exc_info=error)
        self.done("INTERNAL", started)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")


Authenticator = Callable[[str], Awaitable[Principal]]


# The scheme the dashboard's gRPC-Web proxy forwards a browser session's cookie token with.
BROWSER_SESSION_SCHEME = "session"


def credential(metadata: Any) -> tuple[str, str] | None:
    """(scheme, secret) of an `authorization: Bearer <api key>` or `authorization: Session
    <browser session token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, secret = text.partition(" ")
            scheme = scheme.lower()
            if scheme in ("bearer", BROWSER_SESSION_SCHEME) and secret.strip():
                return scheme, secret.strip()
            return None
    return None


def bearer_secret(metadata: Any) -> str | None:
    """The secret of an `authorization: Bearer <secret>` metadata entry, if any."""
    found = credential(metadata)
    return found[1] if found is not None and found[0] == "bearer" else None


# The daemon's long-lived stream is one call, not a request rate: never limited.
RATE_EXEMPT_METHODS: frozenset[str] = frozenset({"/gpuplane.v1.RegistryService/Connect"})
# Operators' keys (and the benchmarks that drive the server with one) are not limited.
RATE_EXEMPT_ROLES: frozenset[Role] = frozenset({Role.ADMIN})


class RateLimiter:
    """A token bucket per credential: `per_second` requests on average, bursts of `burst`.
    `per_second` 0 disables it."""

    MAX_BUCKETS = 100_000

    def __init__(
        self,
        per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = per_second
        self.burst = max(burst, 1)
        self.clock = clock
        # credential id -> (tokens left, when they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def allow(self, credential_id: str) -> bool:
        """Takes one token from the credential's bucket; False when it is empty."""
        if not self.enabled:
            return True
        now = self.clock()
        tokens, counted = self._buckets.get(credential_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * self.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= self.MAX_BUCKETS and credential_id not in self._buckets:
            self._forget_full(now)
        self._buckets[credential_id] = (tokens, now)
        return allowed

    def _forget_full(self, now: float) -> None:
        """Drops buckets that have refilled (forgetting them changes nothing)."""
        for key, (tokens, counted) in list(self._buckets.items()):
            if tokens + (now - counted) * self.per_second >= self.burst:
                del self._buckets[key]
        if len(self._buckets) >= self.MAX_BUCKETS:
            self._buckets.clear()

    def check(self, principal: Principal, method: str) -> None:
        """RESOURCE_EXHAUSTED when `principal` is over its rate on `method`."""
        if method in RATE_EXEMPT_METHODS or principal.role in RATE_EXEMPT_ROLES:
            return
        if not self.allow(principal.principal_id):
            raise ResourceExhausted(
                f"rate limit exceeded: at most {self.per_second:g} requests per second "
                f"(bursts of {self.burst}) per credential; retry later"
            )


async def _no_sessions(token: str) -> Principal:
    raise Unauthenticated("browser sessions are not served here")


class Admission:
    """Who may call a method: the bearer key (or browser session) authenticated, its rate
    limit applied and its role checked against the policy table."""

    def __init__(
        self,
        authenticate: Authenticator,
        limiter: RateLimiter | None = None,
        authenticate_session: Authenticator | None = None,
    ) -> None:
        self.authenticate = authenticate
        self.limiter = limiter
        # A browser session's token (controlplane/auth/browser_sessions.py) stands for its API key.
        self.authenticate_session = authenticate_session or _no_sessions

    async def admit(self, method: str, roles: frozenset[Role], metadata: Any) -> Principal:
        """The caller's principal on `method`, or the domain error that refuses it."""
        found = credential(metadata)
        if found is None:
            raise Unauthenticated(
                "missing credential: send metadata 'authorization: Bearer <api key>'"
            )
        scheme, secret = found
        if scheme == BROWSER_SESSION_SCHEME:
            principal = await self.authenticate_session(secret)
        else:
            principal = await self.authenticate(secret)
        if self.limiter is not None:
            self.limiter.check(principal, method)
        if principal.role not in roles:
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1]} is not allowed for role {principal.role.value}"
            )
        return principal


class Gate(aio.ServerInterceptor):  # type: ignore[type-arg]
    """The one interceptor. Per method, once: a handler that counts and times each call, turns
    domain errors into status codes (the only place: anything else is logged with its
    traceback and answered INTERNAL with a generic message and a reference to the log line),
    admits the caller (`admission`; the principal is then current_principal()) and checks
    every request's text (api/text.py) before the servicer sees it. One wrapper, built once,
    instead of a chain rebuilt per call: the chain cost as much as the call it guarded."""

    def __init__(
        self, metrics: Metrics, admission: Admission | None = None, check_text: bool = True
    ) -> None:
        self.metrics = metrics
        self.admission = admission
        self.check_text = check_text
        # method -> (the servicer's handler, its wrapped twin)
        self._handlers: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        known = self._handlers.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = _rewrap(handler, self._wrapper(method, handler))
        self._handlers[method] = (handler, wrapped)
        return wrapped

    def _wrapper(self, method: str, handler: Handler) -> Wrap:
        call = _RpcCall(self.metrics, method, rpc_type(handler))
        start, done, fail = call.start, call.done, call.fail
        admission = None if method in PUBLIC_METHODS else self.admission
        roles = allowed_roles(method)
        streams_in = bool(handler.stream_unary or handler.stream_stream)
        check = (checked_stream if streams_in else check_request) if self.check_text else None

        async def enter(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            """The request as the servicer gets it, once the caller is admitted."""
            if admission is not None:
                metadata = context.invocation_metadata()
                set_current_principal(await admission.admit(method, roles, metadata))
            return request if check is None else check(request)

        def wrap(behaviour: Any, streams_out: bool) -> Any:
            # A streaming handler is an async generator, or a coroutine that writes its
            # messages with context.write (grpc_health's Watch): the latter is wrapped as a
            # unary one is, its None returned.
            if streams_out and inspect.isasyncgenfunction(behaviour):

                async def stream(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                    started = start()
                    try:
                        async for item in behaviour(await enter(request, context), context):
                            yield item
                    except aio.AbortError:
                        done(aborted_code(context), started)
                        raise
                    except Exception as error:  # noqa: BLE001 - the one catch-all
                        await fail(context, error, started)
                    done("OK", started)

                return stream

            async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                started = start()
                try:
                    response = await behaviour(await enter(request, context), context)
                except aio.AbortError:
                    done(aborted_code(context), started)
                    raise
                except Exception as error:  # noqa: BLE001 - the one catch-all
                    await fail(context, error, started)
                done("OK", started)
                return response

            return unary

        return wrap


class ErrorInterceptor(Gate):
    """The gate with error mapping and metrics only (no credentials, no text check)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics, admission=None, check_text=False)
