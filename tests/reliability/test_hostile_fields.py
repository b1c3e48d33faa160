"""Hostile values in every field, on SQLite and PostgreSQL: a NUL in each string field of each
request (map keys and values, list items, nested messages) is INVALID_ARGUMENT naming that
field and stores nothing; the largest value of each integer field's type gets a deliberate
status, never INTERNAL, and a rejected mutation changes nothing. Extends test_hostile.py,
whose plane and checks it reuses, with every field enumerated rather than sampled."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from gpuplane.v1 import admin_pb2, jobs_pb2, ledger_pb2, registry_pb2, types_pb2

from controlplane.auth.policy import allowed_roles
from controlplane.auth.principal import Role
from devstack.factories import new_tenant
from tests.reliability import summary
from tests.reliability.test_hostile import (
    DELIBERATE,
    INT_RANGES,
    METHODS,
    MUTATING,
    ServedPlane,
    code_of,
    snapshot,
)

FDT = FieldDescriptor
NUL = "a\x00b"
Chain = tuple[FieldDescriptor, ...]
# Requests that get past their handler's first checks, so that a field deep inside them is
# what the control plane judges (an empty SubmitJob fails on spec.image before anything else).
BASELINES: dict[str, Callable[[ServedPlane], Any]] = {
    "SubmitJob": lambda s: jobs_pb2.SubmitJobRequest(
        spec=types_pb2.JobSpec(image="busybox", gpu_count=1, max_duration_seconds=60)
    ),
    "CancelJob": lambda s: jobs_pb2.CancelJobRequest(job_id=s.job_id),
    "GetJob": lambda s: jobs_pb2.GetJobRequest(job_id=s.job_id),
    "GetResults": lambda s: jobs_pb2.GetResultsRequest(job_id=s.job_id),
    "GetJobEfficiency": lambda s: jobs_pb2.GetJobEfficiencyRequest(job_id=s.job_id),
    "StreamLogs": lambda s: jobs_pb2.StreamLogsRequest(job_id=s.job_id),
    "WatchJob": lambda s: jobs_pb2.WatchJobRequest(job_id=s.job_id),
    "Deposit": lambda s: ledger_pb2.DepositRequest(
        tenant_id=s.plane.consumer_tenant, amount_micro_credits=1, idempotency_key="fields"
    ),
    "Payout": lambda s: ledger_pb2.PayoutRequest(
        amount_micro_credits=1, destination="iban:x", idempotency_key="fields"
    ),
    "RefundJob": lambda s: ledger_pb2.RefundJobRequest(
        job_id=s.job_id, amount_micro_credits=1, reason="x", idempotency_key="fields"
    ),
    "CreateTenant": lambda s: admin_pb2.CreateTenantRequest(name="fields"),
    "CreateApiKey": lambda s: admin_pb2.CreateApiKeyRequest(
        tenant_id=s.plane.consumer_tenant, role=types_pb2.ROLE_CONSUMER
    ),
}
UNARY = [m for m in METHODS if not m.client_streaming and not m.server_streaming]
STREAMING = [m for m in METHODS if m.server_streaming and not m.client_streaming]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: Any,
    s3_server: Any,
) -> Iterator[ServedPlane]:
    url = ""
    if request.param == "postgresql":
        cluster = request.getfixturevalue("postgres")
        url = cluster.url(cluster.create_database("hostile_fields"))

    def configure(options: dict[str, Any]) -> None:
        options["database_url"] = url
        options["rate_limit_per_second"] = 0

    data_dir = tmp_path_factory.mktemp(f"fields-{request.param}") / "cp"
    with ServedPlane(data_dir, nats_server.url, s3_server, configure) as served:
        plane = served.plane
        _, provider_key = served.run(new_tenant(plane, "fields-provider", types_pb2.ROLE_PROVIDER))
        served.keys = {
            Role.ADMIN: plane.admin_key,
            Role.CONSUMER: plane.consumer_key,
            Role.PROVIDER: provider_key,
        }
        served.job_id = served.run(plane.submit(gpu_count=1, labels={"team": "a"})).job_id
        yield served


# --- every field of a request ----------------------------------------------------------------


def chains(descriptor: Descriptor, want: Callable[[FieldDescriptor], bool]) -> Iterator[Chain]:
    """Every path to a field `want` accepts: nested messages, list items and map entries."""
    for field in descriptor.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            for part in (entry.fields_by_name["key"], entry.fields_by_name["value"]):
                if want(part):
                    yield (field, part)
        elif entry is not None:
            for rest in chains(entry, want):
                yield (field, *rest)
        elif want(field):
            yield (field,)


def with_value(request: Any, chain: Chain, value: Any) -> str:
    """Sets the field at the end of `chain` in `request` (a new list item or map entry) to
    `value`; returns the field's name as the control plane reports it."""
    target, name = request, ""
    for i, field in enumerate(chain):
        last = i == len(chain) - 1
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            part = chain[i + 1]
            items = getattr(target, field.name)
            key = value if part.name == "key" else "k"
            items[key] = value if part.name == "value" else _zero(entry.fields_by_name["value"])
            return f"{name}{field.name}[{key!r}]"
        if field.is_repeated:
            items = getattr(target, field.name)
            name += f"{field.name}[{len(items)}]"
            if last:
                items.append(value)
                return name
            target = items.add()
        elif last:
            setattr(target, field.name, value)
            return name + field.name
        else:
            name += field.name
            target = getattr(target, field.name)
            target.SetInParent()
        name += "."
    raise AssertionError(chain)


def _zero(field: FieldDescriptor) -> Any:
    return "" if field.type == FDT.TYPE_STRING else 0


def request_for(served: ServedPlane, method: MethodDescriptor) -> Any:
    baseline = BASELINES.get(method.name)
    if baseline is not None:
        return baseline(served)
    return message_factory.GetMessageClass(method.input_type)()


def key_for(served: ServedPlane, method: MethodDescriptor) -> str | None:
    """A key of the role the method is meant for: the consumer's where it may, else another."""
    roles = allowed_roles(f"/{method.containing_service.full_name}/{method.name}")
    for role in (Role.CONSUMER, Role.PROVIDER, Role.ADMIN):
        if role in roles:
            return served.keys[role]
    return None  # public (RegisterHost)


def call(served: ServedPlane, method: MethodDescriptor, request: Any) -> tuple[Any, str]:
    key = key_for(served, method)
    if not method.server_streaming:
        return code_of(lambda: served.call(method, request, key))
    response_cls = message_factory.GetMessageClass(method.output_type)
    stub = served.channel.unary_stream(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )

    def first() -> None:
        stream = stub(request, metadata=(("authorization", f"Bearer {key}"),), timeout=1.5)
        try:
            next(iter(stream), None)
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]

    return code_of(first)


def tenants(served: ServedPlane) -> int:
    method = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods_by_name["ListTenants"]
    reply = served.call(
        method, admin_pb2.ListTenantsRequest(page_size=500), served.keys[Role.ADMIN]
    )
    return len(reply.tenants)


def is_string(field: FieldDescriptor) -> bool:
    return field.type == FDT.TYPE_STRING


def is_integer(field: FieldDescriptor) -> bool:
    return field.type in INT_RANGES


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", UNARY + STREAMING, ids=lambda m: m.name)
def test_nul_in_every_string_field_is_refused_naming_it(
    served: ServedPlane, method: MethodDescriptor
) -> None:
    fields = list(chains(method.input_type, is_string))
    for chain in fields:
        request = request_for(served, method)
        name = with_value(request, chain, NUL)
        before = (snapshot(served), tenants(served))
        code, details = call(served, method, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method.name} {name}: {code.name}"
        assert details.startswith(f"{name}: "), f"{method.name} {name}: {details}"
        assert (snapshot(served), tenants(served)) == before, f"{method.name} {name} stored"
    summary.record("hostile fields", requests_tried=len(fields))


@pytest.mark.parametrize("method", UNARY + STREAMING, ids=lambda m: m.name)
def test_largest_value_in_every_integer_field_gets_a_clean_code(
    served: ServedPlane, method: MethodDescriptor
) -> None:
    fields = list(chains(method.input_type, is_integer))
    for chain in fields:
        for value in sorted(set(INT_RANGES[chain[-1].type])):
            request = request_for(served, method)
            name = with_value(request, chain, value)
            before = snapshot(served) if method.name in MUTATING else None
            code, details = call(served, method, request)
            deliberate = DELIBERATE | (
                {grpc.StatusCode.DEADLINE_EXCEEDED} if method in STREAMING else set()
            )
            assert code in deliberate, f"{method.name} {name}={value}: {code.name} ({details})"
            if before is not None and code != grpc.StatusCode.OK:
                assert snapshot(served) == before, f"rejected {method.name} {name} changed state"
    summary.record("hostile fields", requests_tried=2 * len(fields))


@pytest.mark.parametrize("field", ["memory_bytes", "shm_bytes"])
def test_spec_sizes_beyond_any_host_are_refused_at_submit(served: ServedPlane, field: str) -> None:
    method = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].methods_by_name["SubmitJob"]
    request = BASELINES["SubmitJob"](served)
    setattr(request.spec, field, 2**64 - 1)
    before = snapshot(served)
    code, details = call(served, method, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"spec.{field}: ")
    assert snapshot(served) == before


def test_connect_refuses_nul_in_the_hello(served: ServedPlane) -> None:
    """The daemon's stream is checked message by message like any request."""
    from tests.controlplane.scripted_host import ScriptedHost

    plane = served.plane

    async def register() -> str:
        host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), gpus=1)
        await host.register()
        return host.credential

    credential = served.run(register())
    stub = served.channel.stream_stream(
        "/gpuplane.v1.RegistryService/Connect",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=registry_pb2.ControlMessage.FromString,
    )
    hello = registry_pb2.DaemonMessage(
        hello=registry_pb2.DaemonHello(gpus=[types_pb2.Gpu(uuid="GPU-1", name=NUL)])
    )

    def talk() -> None:
        reply = stub(
            iter([hello]), metadata=(("authorization", f"Bearer {credential}"),), timeout=5
        )
        for _ in reply:
            pass

    code, details = code_of(talk)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("hello.gpus[0].name: ")
