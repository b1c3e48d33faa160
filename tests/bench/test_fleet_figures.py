"""scripts/bench's fleet figures run small: simulated hosts connect to the bare floor server
and to a real control plane (PostgreSQL), and the figure reports what the issue asks for."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fleet
from bench.registry import REGISTRY, RunContext
from bench.resources import Resources

pytestmark = pytest.mark.timeout(240)


def test_the_reconnect_figure_stands_beside_its_floor() -> None:
    assert REGISTRY["fleet_reconnect"].floor == "fleet_connect_floor"
    assert REGISTRY["fleet_connect_floor"].floor is None


async def test_fleet_figures_run_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "FLEET_HOSTS", 12)
    monkeypatch.setattr(fleet, "SETTLE_SECONDS", 1.0)
    async with Resources(tmp_path) as resources:
        ctx = RunContext(
            duration=1.0, resources=resources, workdir=tmp_path, client_processes=1, concurrency=1
        )
        floor = await fleet.fleet_connect_floor(ctx)
        figure = await fleet.fleet_reconnect(ctx)
    assert 0 < floor.figure < 60
    assert 0 < figure.figure < 120
    assert figure.details["hosts"] == 12
    assert figure.details["falsely_lost"] == 0
    assert 0 < float(figure.details["cpu_ms_per_connect"]) < 1000
    assert float(figure.details["whoami_p99_ms"]) > 0
