"""`gpuplane hosts update` against a real control plane: the provider changes its host's
price, location and labels; a flag left out keeps its value; bad flags are named."""

from __future__ import annotations

import asyncio

import pytest
from gpuplane.v1 import types_pb2

from devstack.factories import new_key
from gpuplane_cli.main import main
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

pytestmark = pytest.mark.databases("sqlite")


async def cli(plane: JobPlane, key: str, *argv: str) -> int:
    """`gpuplane` as the holder of `key`, in a thread: it runs its own event loop."""
    environ = {"GPUPLANE_ADDR": plane.address, "GPUPLANE_PLAINTEXT": "1"}
    return await asyncio.to_thread(main, ["--api-key", key, *argv], environ)


async def test_hosts_update_changes_price_location_and_labels(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    host = await scripted_host(plane, gpus=1, price=2_000_000)
    key = await new_key(plane, plane.provider_tenant, types_pb2.ROLE_PROVIDER)
    try:
        update = "hosts", "update", host.host_id
        assert await cli(plane, key, *update, "--price-per-gpu-hour", "2.5", "--label", "t=a") == 0
        out = capsys.readouterr().out
        assert (
            out.strip() == f"host {host.host_id}: 2.500000/GPU-hour, location test-lab, labels t=a"
        )
        assert await cli(plane, key, *update, "--location", "eu-west", "--clear-labels") == 0
        out = capsys.readouterr().out
        assert "2.500000/GPU-hour, location eu-west, labels -" in out

        assert await cli(plane, key, *update) == 2
        assert "nothing to change" in capsys.readouterr().err
        assert await cli(plane, key, *update, "--label", "a=b", "--clear-labels") == 2
        assert "--label and --clear-labels" in capsys.readouterr().err
        assert await cli(plane, key, *update, "--price-per-gpu-hour", "1000") == 2
        assert "--price-per-gpu-hour: " in capsys.readouterr().err  # the flag, not the field
        assert await cli(plane, key, "hosts", "update", "host_nope", "--location", "x") == 3
        assert "NOT_FOUND" in capsys.readouterr().err
    finally:
        await host.close()
