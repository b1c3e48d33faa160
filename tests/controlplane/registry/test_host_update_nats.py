"""UpdateHost answers a host (its own credential) with the NATS servers to use now, so a daemon
whose registration kept other ones in host.json follows a NATS address that moved."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from daemon.identity import HostIdentity, take_nats_servers
from devstack.factories import new_key
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(120)]


async def test_the_host_itself_learns_the_nats_servers_others_do_not(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1)
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    request = registry_pb2.UpdateHostRequest(host_id=host.host_id, location="eu-west")
    try:
        own = await stub.UpdateHost(request, metadata=plane.auth(host.credential))
        assert list(own.nats_servers) == plane.nats_url.split(",")
        assert own.host.location == "eu-west"
        provider = await new_key(plane, plane.provider_tenant, types_pb2.ROLE_PROVIDER)
        theirs = await stub.UpdateHost(request, metadata=plane.auth(provider))
        assert list(theirs.nats_servers) == []
    finally:
        await host.close()


def test_moved_servers_replace_the_kept_ones_and_are_saved(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    identity = HostIdentity("host_1", "cred", "cp:1", nats_servers=["nats://127.0.0.1:1"])
    identity.save(path)
    take_nats_servers(identity, [], path)  # an older control plane: nothing changes
    assert HostIdentity.load(path) == identity
    take_nats_servers(identity, ["nats://127.0.0.1:2"], path)
    saved = HostIdentity.load(path)
    assert saved is not None
    assert saved.nats_servers == ["nats://127.0.0.1:2"]
    assert saved.host_credential == "cred"
