"""scripts/bench's fleet-scale figures run small: simulated hosts connect to the bare server
and to a real control plane (PostgreSQL), and the figure reports what the issue asks for,
idle beside steady."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import fleetscale
from bench.registry import REGISTRY, RunContext
from bench.resources import Resources

pytestmark = pytest.mark.timeout(240)


def test_the_scales_the_issue_names_are_registered() -> None:
    assert {"fleet_scale_1k", "fleet_scale_4k", "fleet_scale_10k"} <= set(REGISTRY)
    assert REGISTRY["fleet_scale_4k"].maximum == 30.0  # all connected within 30 s
    assert (REGISTRY["fleet_scale_10k"].allowance or 0) > (
        REGISTRY["fleet_scale_1k"].allowance or 0
    )


def test_lag_quantiles_come_from_the_buckets_between_two_reads() -> None:
    before = {0.005: 10.0, 0.01: 10.0, 0.1: 10.0, float("inf"): 10.0}
    after = {0.005: 60.0, 0.01: 105.0, 0.1: 109.0, float("inf"): 110.0}
    assert fleetscale.lag_quantile(before, after, 0.5) == "≤ 5 ms"
    assert fleetscale.lag_quantile(before, after, 0.95) == "≤ 10 ms"
    assert fleetscale.lag_quantile(before, after, 0.995) == "> 30 s"
    assert fleetscale.lag_quantile(before, before, 0.99) == "none"


async def test_the_scale_figure_runs_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleetscale, "IDLE_SECONDS", 1.0)
    monkeypatch.setattr(fleetscale, "STEADY_SECONDS", 3.0)
    async with Resources(tmp_path) as resources:
        ctx = RunContext(
            duration=1.0, resources=resources, workdir=tmp_path, client_processes=1, concurrency=1
        )
        figure = await fleetscale.fleet_at_scale(ctx, 12)
    details = figure.details
    assert 0 < figure.figure < 120
    assert 0 < float(details["bare_server_s"]) < 60
    assert (details["hosts"], details["gpus"], details["falsely_lost"]) == (12, 96, 0)
    assert float(details["rss_mib"]) > 50
    assert str(details["heartbeat_lag_p99"]).startswith(("≤", ">"))
    for name in ("whoami_p99_ms", "quote_p99_ms", "submit_p99_ms"):
        assert float(details[name]) > 0
        assert float(details[f"idle_{name}"]) > 0
    assert details["submit_errors"] == 0
