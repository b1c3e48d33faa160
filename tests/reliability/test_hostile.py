"""Hostile clients: hypothesis builds requests for every RPC of the four services from the proto
descriptors (odd strings, extreme numbers, bad ids and page tokens, many labels) and the
control plane must answer each with a deliberate status, never INTERNAL or UNKNOWN, keep
serving, and change nothing when it rejects one. Also: oversized messages and rate limits."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from gpuplane.v1 import (
    admin_pb2,
    data_pb2,
    jobs_pb2,
    ledger_pb2,
    registry_pb2,
    sessions_pb2,
    types_pb2,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.auth.policy import allowed_roles
from controlplane.auth.principal import Role
from devstack.factories import new_tenant
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import JobPlane, job_plane
from tests.reliability import summary

T = TypeVar("T")
FDT = FieldDescriptor
METHODS: list[MethodDescriptor] = [
    method
    for module in (jobs_pb2, registry_pb2, ledger_pb2, admin_pb2, data_pb2, sessions_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
# Requests that may move money or make jobs: a rejected one must leave no trace.
MUTATING = {
    "SubmitJob",
    "Deposit",
    "Payout",
    "RefundJob",
    "CancelJob",
    "CreateSession",
    "ExtendSession",
}
# Codes a hostile request may get; INTERNAL and UNKNOWN are bugs, DEADLINE_EXCEEDED only on
# streams that legitimately wait for more.
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.ABORTED,
}
MAX_MESSAGE_BYTES = 256 * 1024
# Examples per RPC; raise it for a deeper (slower) search, e.g. 500 overnight.
EXAMPLES = int(os.environ.get("GPUPLANE_HOSTILE_EXAMPLES", "25"))
INT_RANGES = {
    FDT.TYPE_INT32: (-(2**31), 2**31 - 1),
    FDT.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FDT.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FDT.TYPE_INT64: (-(2**63), 2**63 - 1),
    FDT.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FDT.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FDT.TYPE_UINT32: (0, 2**32 - 1),
    FDT.TYPE_FIXED32: (0, 2**32 - 1),
    FDT.TYPE_UINT64: (0, 2**64 - 1),
    FDT.TYPE_FIXED64: (0, 2**64 - 1),
}


class ServedPlane:
    """A job plane on its own event loop in a thread, so that hypothesis's (synchronous) tests
    can call it with a blocking channel and still drive async helpers on its loop."""

    def __init__(
        self,
        data_dir: Path,
        nats_url: str,
        s3: Any,
        configure: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.args = (data_dir, nats_url, s3)
        self.configure = configure
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stopping: asyncio.Event | None = None
        self.jp: JobPlane | None = None
        # Keys by role and a job of the consumer's, set up by the fixture.
        self.keys: dict[Role, str] = {}
        self.job_id = ""
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            async with job_plane(*self.args, configure=self.configure) as jp:
                self.jp, self.loop = jp, asyncio.get_running_loop()
                self.stopping = asyncio.Event()
                self.ready.set()
                await self.stopping.wait()

        try:
            asyncio.run(serve())
        except BaseException as error:  # noqa: BLE001 - reported to the test thread
            self.error = error
        finally:
            self.ready.set()

    def __enter__(self) -> ServedPlane:
        self.thread.start()
        assert self.ready.wait(60), "control plane did not start"
        if self.error is not None:
            raise self.error
        self.channel = grpc.insecure_channel(self.plane.address)
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        assert self.loop is not None
        assert self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(30)

    @property
    def plane(self) -> JobPlane:
        assert self.jp is not None
        return self.jp

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        assert self.loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def call(
        self, method: MethodDescriptor, request: Any, key: str | None, timeout: float = 10
    ) -> Any:
        """One unary call; raises grpc.RpcError."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        response_cls = message_factory.GetMessageClass(method.output_type)
        stub = self.channel.unary_unary(
            path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        metadata = (("authorization", f"Bearer {key}"),) if key else None
        return stub(request, metadata=metadata, timeout=timeout)

    def health(self) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, nats_server: Any, s3_server: Any
) -> Iterator[ServedPlane]:
    def small_messages(options: dict[str, Any]) -> None:
        options["max_message_bytes"] = MAX_MESSAGE_BYTES
        options["rate_limit_per_second"] = 0  # hypothesis is faster than any sane limit

    data_dir = tmp_path_factory.mktemp("hostile") / "cp"
    with ServedPlane(data_dir, nats_server.url, s3_server, small_messages) as served:
        plane = served.plane
        _, provider_key = served.run(new_tenant(plane, "hostile-provider", types_pb2.ROLE_PROVIDER))
        served.keys = {
            Role.ADMIN: plane.admin_key,
            Role.CONSUMER: plane.consumer_key,
            Role.PROVIDER: provider_key,
        }
        served.job_id = served.run(plane.submit(gpu_count=1, labels={"team": "a"})).job_id
        yield served


# --- strategies built from the descriptors --------------------------------------------------

NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "\x00" * 64,
    "../../etc/passwd",
    "' OR 1=1 --",
    "%s%s%n",
    "{}",
    "null",
    "\u202e\u0000\ufeff",
    "🔥" * 50,
    "e\u0301" * 20,
    "job_",
    "ten_",
    "host_",
    "key_",
    "a" * 41,
    "a" * 10_000,
    "platform",
    "-1",
    "9" * 40,
    "gpk_" + "A" * 43,
]


def _token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["t", "id", "after", "offset"]), children, max_size=3)
    ),
    max_leaves=6,
)
PAGE_TOKENS = st.one_of(
    st.sampled_from(
        [
            _token({"t": "not a time", "id": "x"}),
            _token({"t": 5, "id": None}),
            _token({"offset": -1}),
            _token({"offset": 10**30}),
            _token({"offset": 1.5}),
            _token({"after": ["x"]}),
            _token({"after": {"a": 1}}),
            _token({"after": None}),
            _token({"t": "9999-12-31T23:59:59+00:00", "id": "z"}),
            _token([1, 2]),
            "!!!",
            "====",
            "a",
        ]
    ),
    JSON.map(_token),
    st.text(max_size=30),
)


def text_for(field: FieldDescriptor, ids: list[str]) -> st.SearchStrategy[str]:
    choices: list[st.SearchStrategy[str]] = [
        st.text(max_size=30),
        st.sampled_from(NASTY_STRINGS),
        st.integers(1000, 70_000).map(lambda n: "x" * n),
    ]
    if field.name == "page_token":
        choices.append(PAGE_TOKENS)
    if field.name.endswith("_id") and ids:
        choices.append(st.sampled_from(ids))
    return st.one_of(choices)


def scalar_for(field: FieldDescriptor, ids: list[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FDT.TYPE_STRING:
        return text_for(field, ids)
    if kind == FDT.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FDT.TYPE_BOOL:
        return st.booleans()
    if kind in (FDT.TYPE_DOUBLE, FDT.TYPE_FLOAT):
        return st.floats(width=64 if kind == FDT.TYPE_DOUBLE else 32)
    if kind == FDT.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    low, high = INT_RANGES[kind]
    edges = [v for v in (0, 1, -1, 2**31 - 1, 2**53, 2**63 - 1, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -5), 100))


def timestamps() -> st.SearchStrategy[dict[str, int]]:
    return st.fixed_dictionaries(
        {
            "seconds": st.one_of(
                st.sampled_from([0, -1, 253_402_300_800, -62_135_596_801, 2**63 - 1, -(2**63)]),
                st.integers(-(2**40), 2**40),
            ),
            "nanos": st.one_of(st.just(0), st.integers(-(2**31), 2**31 - 1)),
        }
    )


def value_for(field: FieldDescriptor, ids: list[str], depth: int) -> st.SearchStrategy[Any]:
    if field.type == FDT.TYPE_MESSAGE:
        assert field.message_type is not None
        return message_of(field.message_type, ids, depth + 1)
    return scalar_for(field, ids)


@st.composite
def message_of(draw: st.DrawFn, descriptor: Descriptor, ids: list[str], depth: int = 0) -> Any:
    """A message of `descriptor` with a random subset of its fields set to hostile values."""
    message = message_factory.GetMessageClass(descriptor)()
    if descriptor.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        for name, value in draw(timestamps()).items():
            setattr(message, name, value)
        return message
    if depth > 3:
        return message
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        target = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_field = entry.fields_by_name["key"]
            value_field = entry.fields_by_name["value"]
            size = draw(st.sampled_from([1, 3, 300]) | st.integers(0, 5))
            for _ in range(size):
                key = draw(scalar_for(key_field, ids))
                value = draw(value_for(value_field, ids, depth))
                if value_field.type == FDT.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
        elif field.is_repeated:
            values = draw(st.lists(value_for(field, ids, depth), max_size=4))
            if field.type == FDT.TYPE_MESSAGE:
                for value in values:
                    target.add().CopyFrom(value)
            else:
                target.extend(values)
        elif field.type == FDT.TYPE_MESSAGE:
            target.CopyFrom(draw(value_for(field, ids, depth)))
        else:
            setattr(message, field.name, draw(value_for(field, ids, depth)))
    return message


# --- checking one hostile request -----------------------------------------------------------


def snapshot(served: ServedPlane) -> tuple[Any, ...]:
    """What a rejected mutating request must not change: transfers, balances, job count."""
    admin = served.plane.admin_key
    ledger_service = ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"]
    jobs_service = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    report = served.call(
        ledger_service.methods_by_name["CheckLedger"], ledger_pb2.CheckLedgerRequest(), admin
    )
    assert report.consistent
    assert report.balance_sum_micro_credits == 0
    balances = tuple(
        served.call(
            ledger_service.methods_by_name["GetBalance"],
            ledger_pb2.GetBalanceRequest(tenant_id=tenant),
            admin,
        ).balance.SerializeToString()
        for tenant in (served.plane.consumer_tenant, served.plane.provider_tenant)
    )
    jobs = served.call(
        jobs_service.methods_by_name["ListJobs"], jobs_pb2.ListJobsRequest(page_size=500), admin
    )
    states = tuple(sorted((j.job_id, j.state) for j in jobs.jobs))
    return report.transfer_count, balances, states


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def check_unary(
    served: ServedPlane, method: MethodDescriptor, request: Any, key: str | None
) -> None:
    before = snapshot(served) if method.name in MUTATING else None
    code, details = code_of(lambda: served.call(method, request, key))
    unexpected = code not in DELIBERATE
    summary.record("hostile requests", requests_tried=1, unexpected_internal=int(unexpected))
    assert not unexpected, f"{method.name} answered {code.name} ({details}) to {request!r:.2000}"
    if before is not None and code != grpc.StatusCode.OK:
        assert snapshot(served) == before, f"rejected {method.name} ({code.name}) changed state"


def caller_for(served: ServedPlane, method: MethodDescriptor) -> st.SearchStrategy[str | None]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    keys = served.keys
    roles = [r for r in allowed_roles(path) if r in keys]
    if not roles:  # public (RegisterHost): no key, or a stray one
        return st.sampled_from([None, keys[Role.CONSUMER]])
    return st.sampled_from([keys[r] for r in roles])


def known_ids(served: ServedPlane) -> list[str]:
    plane = served.plane
    return [served.job_id, plane.consumer_tenant, plane.provider_tenant, "platform"]


UNARY = [m for m in METHODS if not m.client_streaming and not m.server_streaming]
STREAMING = [m for m in METHODS if m.server_streaming and not m.client_streaming]


@pytest.mark.parametrize("method", UNARY, ids=lambda m: m.name)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_unary_rpc_survives_hostile_requests(
    served: ServedPlane, method: MethodDescriptor, data: st.DataObject
) -> None:
    request = data.draw(message_of(method.input_type, known_ids(served)), label="request")
    key = data.draw(caller_for(served, method), label="caller")
    check_unary(served, method, request, key)


@pytest.mark.parametrize("method", STREAMING, ids=lambda m: m.name)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_server_stream_survives_hostile_requests(
    served: ServedPlane, method: MethodDescriptor, data: st.DataObject
) -> None:
    request = data.draw(message_of(method.input_type, known_ids(served)), label="request")
    key = data.draw(caller_for(served, method), label="caller")
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_cls = message_factory.GetMessageClass(method.output_type)
    stub = served.channel.unary_stream(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )

    def first() -> None:
        call = stub(request, metadata=(("authorization", f"Bearer {key}"),), timeout=1.5)
        try:
            next(iter(call), None)
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    code, details = code_of(first)
    # A stream on a live job legitimately waits for more: its deadline is not a fault.
    unexpected = code not in DELIBERATE | {grpc.StatusCode.DEADLINE_EXCEEDED}
    unexpected = unexpected and code != grpc.StatusCode.CANCELLED
    summary.record("hostile requests", requests_tried=1, unexpected_internal=int(unexpected))
    assert not unexpected, f"{method.name} answered {code.name} ({details}) to {request!r:.2000}"


def test_connect_survives_hostile_daemon_messages(served: ServedPlane) -> None:
    """A registered host sends a hello and then hostile telemetry/heartbeats: the stream
    answers with a deliberate status (or keeps going), and the server stays up."""
    plane = served.plane

    async def register() -> str:
        token = await plane.token()
        host = ScriptedHost(plane.channel, plane.nats_url, token, gpus=1)
        await host.register()
        return host.credential

    credential = served.run(register())
    connect = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].methods_by_name["Connect"]
    stub = served.channel.stream_stream(
        "/gpuplane.v1.RegistryService/Connect",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=registry_pb2.ControlMessage.FromString,
    )
    tried = 0

    @settings(max_examples=EXAMPLES, deadline=None, database=None)
    @given(
        messages=st.lists(message_of(connect.input_type, known_ids(served)), min_size=1, max_size=4)
    )
    def one(messages: list[registry_pb2.DaemonMessage]) -> None:
        nonlocal tried
        tried += 1

        def talk() -> None:
            call = stub(
                iter(messages), metadata=(("authorization", f"Bearer {credential}"),), timeout=1.5
            )
            try:
                for _ in call:
                    pass
            finally:
                call.cancel()  # type: ignore[no-untyped-call]

        code, details = code_of(talk)
        ok = code in DELIBERATE | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
        summary.record("hostile requests", requests_tried=1, unexpected_internal=int(not ok))
        assert ok, f"Connect answered {code.name} ({details}) to {messages!r:.2000}"

    one()
    assert served.health() == health_pb2.HealthCheckResponse.SERVING
    summary.record("hostile requests", f"{len(METHODS)} RPCs x {EXAMPLES} hypothesis examples")


def test_still_serving_and_ledger_consistent(served: ServedPlane) -> None:
    assert served.health() == health_pb2.HealthCheckResponse.SERVING
    served.run(served.plane.assert_ledger_consistent())


@pytest.mark.parametrize("method", UNARY, ids=lambda m: m.name)
def test_oversized_message_is_resource_exhausted(
    served: ServedPlane, method: MethodDescriptor
) -> None:
    """A request beyond max_message_bytes is refused before any handler runs."""
    request = message_factory.GetMessageClass(method.input_type)()
    # Unknown fields travel and count toward the size like any other: every RPC can get one.
    request.MergeFromString(
        b"\xfa\x3f" + _varint(MAX_MESSAGE_BYTES + 1) + b"x" * (MAX_MESSAGE_BYTES + 1)
    )
    key = served.plane.admin_key
    code, _ = code_of(lambda: served.call(method, request, key))
    summary.record("oversized messages", requests_tried=1)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.health() == health_pb2.HealthCheckResponse.SERVING


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_rate_limit_per_key(tmp_path: Path, nats_server: Any, s3_server: Any) -> None:
    """Each API key has its own token bucket: a burst beyond it is RESOURCE_EXHAUSTED, other
    keys, health and hosts' Connect streams are unaffected, and tokens come back with time."""

    def low_limit(options: dict[str, Any]) -> None:
        options["rate_limit_per_second"] = 5
        options["rate_limit_burst"] = 10

    with ServedPlane(tmp_path / "cp", nats_server.url, s3_server, low_limit) as served:
        plane = served.plane
        _, other_key = served.run(new_tenant(plane, "other", types_pb2.ROLE_CONSUMER))
        who = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name["WhoAmI"]
        started = time.monotonic()
        codes = [
            code_of(lambda: served.call(who, admin_pb2.WhoAmIRequest(), plane.consumer_key))[0]
            for _ in range(30)
        ]
        elapsed = time.monotonic() - started
        allowed = codes.count(grpc.StatusCode.OK)
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert 10 <= allowed <= 10 + int(elapsed * 5) + 1
        # Another key has its own bucket; health and admin keys are not limited.
        assert code_of(lambda: served.call(who, admin_pb2.WhoAmIRequest(), other_key))[0] == (
            grpc.StatusCode.OK
        )
        for _ in range(20):
            assert served.health() == health_pb2.HealthCheckResponse.SERVING
            served.call(who, admin_pb2.WhoAmIRequest(), plane.admin_key)

        async def connected_host() -> str:
            token = await plane.token()
            host = ScriptedHost(
                plane.channel, plane.nats_url, token, gpus=1, heartbeat_interval=0.01
            )
            await host.start()  # 100 heartbeats a second on one Connect stream
            await asyncio.sleep(0.5)
            await host.close()
            return host.host_id

        assert served.run(connected_host())
        time.sleep(0.3)  # about 1.5 tokens come back
        assert code_of(lambda: served.call(who, admin_pb2.WhoAmIRequest(), plane.consumer_key))[
            0
        ] == (grpc.StatusCode.OK)
        summary.record(
            "rate limit (5/s, burst 10)",
            f"{allowed} of 30 burst calls admitted, the rest RESOURCE_EXHAUSTED",
            requests_tried=len(codes) + 42,
        )


def _method(service: str, name: str) -> MethodDescriptor:
    for method in METHODS:
        if method.containing_service.name == service and method.name == name:
            return method
    raise KeyError(name)


def test_extreme_amounts_are_refused_without_effect(served: ServedPlane) -> None:
    """Money at the edges of int64: a deposit that would overflow a balance, payouts and
    refunds of more than exists, a job whose hold cannot be represented."""
    plane = served.plane
    big = 2**63 - 1
    cases: list[tuple[str, str, Any, str]] = [
        (
            "LedgerService",
            "Deposit",
            ledger_pb2.DepositRequest(
                tenant_id=plane.consumer_tenant, amount_micro_credits=big, idempotency_key="max-1"
            ),
            plane.admin_key,
        ),
        (
            "LedgerService",
            "Deposit",
            ledger_pb2.DepositRequest(
                tenant_id=plane.consumer_tenant, amount_micro_credits=big, idempotency_key="max-2"
            ),
            plane.admin_key,
        ),
        (
            "LedgerService",
            "Payout",
            ledger_pb2.PayoutRequest(
                amount_micro_credits=big, destination="iban:x", idempotency_key="p-max"
            ),
            served.keys[Role.PROVIDER],
        ),
        (
            "LedgerService",
            "RefundJob",
            ledger_pb2.RefundJobRequest(
                job_id=served.job_id, amount_micro_credits=big, reason="x", idempotency_key="r-max"
            ),
            plane.admin_key,
        ),
        (
            "JobService",
            "SubmitJob",
            jobs_pb2.SubmitJobRequest(
                spec=types_pb2.JobSpec(
                    image="busybox",
                    gpu_count=64,
                    max_duration_seconds=30 * 24 * 3600,
                    max_price_per_gpu_hour_micro_credits=10**12,
                )
            ),
            plane.consumer_key,
        ),
    ]
    for service, name, request, key in cases:
        check_unary(served, _method(service, name), request, key)
    served.run(plane.assert_ledger_consistent())
