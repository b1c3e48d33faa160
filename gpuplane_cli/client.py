"""How CLI commands reach the control plane: env files, address and key, errors and exit codes."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from gpuplane.v1 import (
    admin_pb2_grpc,
    data_pb2_grpc,
    jobs_pb2_grpc,
    ledger_pb2_grpc,
    registry_pb2_grpc,
    sessions_pb2_grpc,
)
from grpc import aio

from daemon.channel import ChannelConfigError, ChannelSecurity, open_channel
from gpuplane_cli.flags import in_flags
from messaging.secretfiles import SecretFileError, read_secret_file

DEFAULT_ADDR = "127.0.0.1:50051"
# Unary calls give up after this long unless --timeout says otherwise; streams never do.
DEFAULT_TIMEOUT = 30.0

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Item = TypeVar("Item")

# Exit codes by class of failure, so scripts can tell them apart.
EXIT_OK = 0
EXIT_ERROR = 1  # internal, unknown, anything unclassified
EXIT_USAGE = 2  # bad flags (argparse), INVALID_ARGUMENT, OUT_OF_RANGE
EXIT_NOT_FOUND = 3
EXIT_AUTH = 4  # UNAUTHENTICATED, PERMISSION_DENIED
EXIT_CONFLICT = 5  # FAILED_PRECONDITION, ALREADY_EXISTS, ABORTED
EXIT_EXHAUSTED = 6  # RESOURCE_EXHAUSTED
EXIT_UNAVAILABLE = 7  # UNAVAILABLE, DEADLINE_EXCEEDED: the control plane could not be reached
EXIT_UNIMPLEMENTED = 8
EXIT_JOB_FAILED = 9  # a waited-for job ended in a state other than SUCCEEDED
EXIT_INTERRUPTED = 130

_EXIT_OF: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_CONFLICT,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_CONFLICT,
    grpc.StatusCode.ABORTED: EXIT_CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: EXIT_UNIMPLEMENTED,
}


class CliError(Exception):
    """A failure to report as `error: <message>` with an exit code, without a traceback."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


async def all_pages(
    fetch: Callable[[str, int], Awaitable[tuple[Sequence[Item], str]]], limit: int = 0
) -> tuple[list[Item], bool]:
    """Follows page tokens: `fetch(token, page_size)` returns (items, next_token). Stops after
    `limit` items (0 = all); returns the items and whether more were left."""
    items: list[Item] = []
    token = ""
    while True:
        want = min(limit - len(items), 500) if limit else 500
        page, token = await fetch(token, want)
        items.extend(page)
        if not token or (limit and len(items) >= limit):
            return (items[:limit] if limit else items), bool(token)


def exit_code_for(code: grpc.StatusCode) -> int:
    return _EXIT_OF.get(code, EXIT_ERROR)


# A request's bad argument, named by its field: what `in_flags` may rename.
_NAMES_A_FIELD = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
)


def describe_rpc_error(
    error: grpc.RpcError,
    addr: str,
    args: argparse.Namespace | None = None,
) -> str:
    """`<CODE>: <details>`, with a hint for the failures a user can fix; given the command's
    `args`, a field the details start with is named by its flag (`--memory`, not
    `spec.memory_bytes`)."""
    code: grpc.StatusCode = error.code()
    details = error.details() or ""
    if args is not None and code in _NAMES_A_FIELD:
        details = in_flags(details, args)
    text = f"{code.name}: {details}"
    if code is grpc.StatusCode.UNAVAILABLE:
        text += (
            f"\nhint: is a control plane listening on {addr}? "
            "(set GPUPLANE_ADDR or --addr, or see `gpuplane context list`)"
        )
        if "handshake" in details.lower() or "ssl" in details.lower():
            text += (
                "\nhint: TLS failed: give the CA that signed its certificate (GPUPLANE_CA_FILE "
                "or --cacert), or --plaintext for a dev stack"
            )
    elif code is grpc.StatusCode.UNAUTHENTICATED:
        text += (
            "\nhint: set GPUPLANE_API_KEY or pass --api-key (or --env-file FILE, or a "
            "context's --api-key-file)"
        )
    return text


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as a shell would read them: comments, `export`, quotes."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise CliError(f"env file line {number} is not KEY=VALUE: {raw!r}", EXIT_USAGE)
        try:
            words = shlex.split(value, comments=True)
        except ValueError as exc:
            raise CliError(f"env file line {number}: {exc}", EXIT_USAGE) from None
        values[key.strip()] = " ".join(words)
    return values


def load_env_file(path: str, environ: MutableMapping[str, str], *, override: bool) -> None:
    """Reads an env file into `environ`. With `override` its values replace the environment's
    (a file named on the command line); without, they only fill what the environment lacks."""
    try:
        text = Path(path).expanduser().read_text()
    except OSError as exc:
        raise CliError(f"cannot read env file {path}: {exc.strerror}", EXIT_USAGE) from None
    for key, value in parse_env_file(text).items():
        if override or key not in environ:
            environ[key] = value


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Target:
    """Where and as whom to call: from --addr/--api-key, else GPUPLANE_ADDR/GPUPLANE_API_KEY."""

    addr: str
    api_key: str
    timeout: float | None
    security: ChannelSecurity = ChannelSecurity()

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
        """Flags, else the environment (env files applied), else the context, else defaults."""
        from gpuplane_cli.contexts import layered  # it imports this module

        environ = layered(args, environ)
        addr = getattr(args, "addr", None) or environ.get("GPUPLANE_ADDR") or DEFAULT_ADDR
        key = getattr(args, "api_key", None) or environ.get("GPUPLANE_API_KEY", "")
        key_file = environ.get("GPUPLANE_API_KEY_FILE", "").strip()
        if not key and key_file:
            try:
                key = read_secret_file(Path(key_file).expanduser(), "GPUPLANE_API_KEY_FILE")
            except SecretFileError as exc:
                raise CliError(str(exc), EXIT_USAGE) from None
        timeout = getattr(args, "timeout", None)
        return cls(
            addr=addr, api_key=key.strip(), timeout=timeout, security=security_of(args, environ)
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def security_of(args: argparse.Namespace, environ: Mapping[str, str]) -> ChannelSecurity:
    """TLS (flags, else GPUPLANE_CA_FILE/CERT_FILE/KEY_FILE) unless --plaintext or
    GPUPLANE_PLAINTEXT; a flag naming a file wins over plaintext from the environment."""

    def path(flag: str, env: str) -> Path | None:
        value = getattr(args, flag, None) or environ.get(env, "").strip()
        return Path(value).expanduser() if value else None

    ca, cert, key = (
        path("cacert", "GPUPLANE_CA_FILE"),
        path("cert", "GPUPLANE_CERT_FILE"),
        path("key", "GPUPLANE_KEY_FILE"),
    )
    tls_flags = any(getattr(args, flag, None) for flag in ("cacert", "cert", "key"))
    plaintext = bool(getattr(args, "plaintext", False)) or (
        env_flag(environ, "GPUPLANE_PLAINTEXT") and not tls_flags
    )
    try:
        if plaintext:
            if tls_flags:
                raise ChannelConfigError("--plaintext and --cacert/--cert/--key exclude each other")
            return ChannelSecurity(plaintext=True)
        return ChannelSecurity(ca_file=ca, cert_file=cert, key_file=key)
    except ChannelConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


class Client:
    """Typed stubs of every service over one channel, with the caller's bearer key."""

    def __init__(self, target: Target) -> None:
        self.target = target
        try:
            self.channel = open_channel(target.addr, target.security)
        except ChannelConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        self.metadata = target.metadata()
        self.timeout = target.timeout
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.data = data_pb2_grpc.DataServiceStub(self.channel)
        self.sessions = sessions_pb2_grpc.SessionServiceStub(self.channel)

    async def call(self, method: aio.UnaryUnaryMultiCallable[Req, Resp], request: Req) -> Resp:
        """One unary call with the caller's key and the unary timeout."""
        return await method(
            request, metadata=self.metadata, timeout=self.timeout or DEFAULT_TIMEOUT
        )

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class Context:
    """What a command handler gets besides its arguments: the environment (with env files
    applied), the output mode and a lazily opened client."""

    args: argparse.Namespace
    environ: MutableMapping[str, str]
    _client: Client | None = field(default=None, repr=False)

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    @property
    def target(self) -> Target:
        return Target.from_args(self.args, self.environ)

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.target)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
