"""Fixtures: an in-process control plane on port 0 with a SQLite database in a temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from gpuplane.v1 import admin_pb2, admin_pb2_grpc, types_pb2

from controlplane.server import ControlPlane
from controlplane.settings import Settings


@dataclass
class RunningControlPlane:
    plane: ControlPlane
    address: str
    admin_key: str
    channel: grpc.aio.Channel

    def auth(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key or self.admin_key}"),)

    async def new_tenant_key(
        self, name: str, role: types_pb2.Role.ValueType = types_pb2.ROLE_CONSUMER
    ) -> tuple[str, str]:
        """Creates a tenant and a key of `role` for it; returns (tenant_id, secret)."""
        admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        tenant = await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name=name), metadata=self.auth()
        )
        key = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=tenant.tenant.tenant_id, role=role),
            metadata=self.auth(),
        )
        return tenant.tenant.tenant_id, key.secret


def sqlite_settings(data_dir: Path, **overrides: object) -> Settings:
    return Settings(
        data_dir=data_dir,
        listen_addr="127.0.0.1:0",
        metrics_addr="127.0.0.1:0",
        allow_plaintext=True,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[RunningControlPlane]:
    plane = ControlPlane(sqlite_settings(tmp_path / "cp"))
    await plane.start()
    assert plane.admin_key_file is not None
    admin_key = Path(plane.admin_key_file).read_text().strip()
    address = f"127.0.0.1:{plane.port}"
    channel = grpc.aio.insecure_channel(address)
    try:
        yield RunningControlPlane(plane, address, admin_key, channel)
    finally:
        await channel.close(None)
        await plane.stop(grace=0)
