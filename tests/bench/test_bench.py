"""scripts/bench: the registry's planning, and a short real run printing valid JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import format_table
from bench.registry import REGISTRY, Result, plan

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench"
FIELDS = {"name", "figure", "unit", "floor", "ratio", "target"}


def test_every_figure_names_a_registered_floor() -> None:
    assert REGISTRY, "importing bench.cli registers the benchmarks"
    for figure in REGISTRY.values():
        if figure.floor is not None:
            assert figure.floor in REGISTRY, figure.name
            assert REGISTRY[figure.floor].floor is None, "a floor is measured, not compared"


def test_plan_runs_a_figures_floor_first() -> None:
    names = [b.name for b in plan(["authenticated_noop_rpc"])]
    assert names == ["grpc_echo_qps", "authenticated_noop_rpc"]
    assert [b.name for b in plan(["grpc_echo_qps", "grpc_echo_qps"])] == ["grpc_echo_qps"]
    with pytest.raises(KeyError, match="no benchmark"):
        plan(["no_such_thing"])


def test_table_shows_ratio_and_target() -> None:
    floor = Result("grpc_echo_qps", 4000.0, "calls/s", None, None, None, None, "higher", 1.0)
    figure = Result(
        "authenticated_noop_rpc", 3000.0, "calls/s", 4000.0, "grpc_echo_qps", 0.75, 0.5,
        "higher", 1.0, {"p99_ms": 2.5},
    )  # fmt: skip
    failed = Result("pg_tx", None, "tx/s", None, None, None, None, "higher", 0.1, error="boom")
    text = format_table([floor, figure, failed])
    assert ">= 0.5 ok" in text
    assert "0.750" in text
    assert "FAILED" in text
    assert figure.meets_target is True


def test_an_absolute_minimum_is_checked_with_the_ratio() -> None:
    def settled(figure: float, ratio: float) -> Result:
        return Result(
            "settlements_per_s", figure, "settle/s", 1500.0, "pg_tx", ratio, 2.0, "higher", 1.0,
            minimum=3000,
        )  # fmt: skip

    assert settled(3100.0, 2.07).meets_target is True
    assert settled(2900.0, 2.5).meets_target is False  # the ratio alone would pass
    assert settled(3100.0, 1.9).meets_target is False
    assert ">= 2 and >= 3,000 settle/s MISSED" in format_table([settled(2900.0, 2.5)])
    only = Result("x", 10.0, "x/s", None, None, None, None, "higher", 1.0, minimum=5)
    assert only.meets_target is True
    assert ">= 5 x/s ok" in format_table([only])


def test_list_names_every_benchmark() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--list"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("grpc_echo_qps", "pg_tx", "jetstream_publish", "docker_run"):
        assert name in out
    assert "authenticated_noop_rpc" in out


@pytest.mark.timeout(90)
def test_grpc_echo_floor_prints_json() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--only", "grpc_echo_qps", "--json", "--duration", "0.5", "--clients", "1"],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert isinstance(results, list)
    assert len(results) == 1
    result = results[0]
    assert FIELDS <= result.keys()
    assert result["name"] == "grpc_echo_qps"
    assert result["unit"] == "calls/s"
    assert result["figure"] > 0
    assert result["floor"] is None
    assert result["ratio"] is None
    assert result["details"]["errors"] == 0


def test_cpu_steal_is_a_share_of_all_cpu_time() -> None:
    from bench.machine import cpu_ticks, steal_percent

    ticks = cpu_ticks()
    assert ticks is not None, "this Linux machine has /proc/stat"
    assert 0 <= ticks[0] <= ticks[1]
    assert steal_percent((10, 1000), (60, 1200)) == 25.0
    assert steal_percent((10, 1000), (10, 1000)) is None  # no time passed
    assert steal_percent(None, ticks) is None


@pytest.mark.timeout(90)
def test_report_signing_figure_prints_beside_the_unsigned_path() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--only", "report_signed_per_core", "--json", "--duration", "0.5"],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = {r["name"]: r for r in json.loads(done.stdout)}
    unsigned, signed = results["report_unsigned_per_core"], results["report_signed_per_core"]
    assert signed["floor"] == unsigned["figure"] > signed["figure"] > 0
    assert signed["ratio"] == pytest.approx(signed["figure"] / unsigned["figure"], rel=1e-3)
    assert signed["details"]["reports"] > 0


@pytest.mark.timeout(120)
def test_probe_check_reports_the_control_planes_time_per_gpu() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--only", "probe_check", "--json", "--duration", "0.5"],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert FIELDS <= result.keys()
    assert result["unit"] == "ms/GPU"
    assert result["figure"] > 0
    details = result["details"]
    assert (details["n"], details["rounds"]) == (512, 4)
    assert details["checks"] >= 3
    assert details["answer_bytes"] > 0
