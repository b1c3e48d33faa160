"""A daemon's registration outlasts a control plane shedding load: CANCELLED,
RESOURCE_EXHAUSTED and ABORTED answers (what gRPC core and an overloaded control plane give
thousands of hosts registering at once) are retried like UNAVAILABLE, while a refusal
(INVALID_ARGUMENT) still stops it with the reason. A real gRPC server on loopback answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from gpuplane.v1 import registry_pb2, types_pb2
from pydantic import SecretStr

from daemon.gpus import GpuInventory
from daemon.identity import RegistrationError, register, until_answered
from daemon.settings import DaemonSettings

pytestmark = [pytest.mark.timeout(30)]


class Shedding:
    """Answers RegisterHost with `codes` in turn, then registers the host."""

    def __init__(self, codes: list[grpc.StatusCode]) -> None:
        self.codes = codes
        self.calls = 0

    async def register_host(
        self, request: registry_pb2.RegisterHostRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> registry_pb2.RegisterHostResponse:
        self.calls += 1
        if self.codes:
            await context.abort(self.codes.pop(0), "not now")
        return registry_pb2.RegisterHostResponse(
            host_id="host-retried", host_credential="hc_secret", heartbeat_interval_ms=2000
        )


async def registered(tmp_path: Path, servicer: Shedding) -> str:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.register_host,
        request_deserializer=registry_pb2.RegisterHostRequest.FromString,
        response_serializer=registry_pb2.RegisterHostResponse.SerializeToString,
    )
    service = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {"RegisterHost": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        settings = DaemonSettings(
            control_plane=f"127.0.0.1:{port}",
            plaintext=True,
            registration_token=SecretStr("rt_token"),
            data_dir=tmp_path,
            simulate_gpus="1xA100-80GB",
            reconnect_base_seconds=0.01,
            reconnect_max_seconds=0.05,
        )
        inventory = GpuInventory(gpus=[types_pb2.Gpu(uuid="GPU-1")])
        async with grpc.aio.insecure_channel(settings.control_plane) as channel:
            identity = await until_answered(
                settings, lambda: register(settings, inventory, channel)
            )
        return identity.host_id
    finally:
        await server.stop(None)


async def test_load_shedding_answers_are_retried_until_registered(tmp_path: Path) -> None:
    shed = [
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAVAILABLE,
    ]
    servicer = Shedding(list(shed))
    assert await registered(tmp_path, servicer) == "host-retried"
    assert servicer.calls == len(shed) + 1
    assert (tmp_path / "host.json").exists()


async def test_a_refusal_stops_registration_with_its_reason(tmp_path: Path) -> None:
    servicer = Shedding([grpc.StatusCode.INVALID_ARGUMENT])
    with pytest.raises(RegistrationError, match="INVALID_ARGUMENT: not now"):
        await registered(tmp_path, servicer)
    assert servicer.calls == 1
