"""`gpuplane jobs efficiency`, `jobs get`'s utilisation and `ledger usage --by/--platform`
against a real control plane whose daemons (played by the test) report GPU utilisation."""

from __future__ import annotations

import asyncio
import json

import pytest
from gpuplane.v1 import types_pb2

from gpuplane_cli.main import main
from tests.controlplane.ledger.test_usage_efficiency import (
    A100,
    H100,
    HOUR_MS,
    start_host,
    two_measured_jobs,
)
from tests.harness import JobPlane

pytestmark = pytest.mark.timeout(90)


async def gpuplane(
    plane: JobPlane, capsys: pytest.CaptureFixture[str], *argv: str, key: str | None = None
) -> tuple[int, str, str]:
    """`gpuplane` (as the consumer unless `key`) in a thread: it runs its own event loop."""
    environ = {"GPUPLANE_ADDR": plane.address, "GPUPLANE_PLAINTEXT": "1"}
    capsys.readouterr()
    words = ["--api-key", key or plane.consumer_key, *argv]

    def run() -> int:
        try:
            return main(words, environ)
        except SystemExit as exit_:  # argparse refusing a flag
            return int(exit_.code or 0)

    code = await asyncio.to_thread(run)
    out, err = capsys.readouterr()
    return code, out, err


def line_of(out: str, first: str) -> list[str]:
    """The words of the table row whose first cell is `first`."""
    for line in out.splitlines():
        if line.startswith(first + " ") or line.split("  ")[0] == first:
            return line.split()
    raise AssertionError(f"no row {first!r} in:\n{out}")


async def test_efficiency_get_and_usage_by_every_grouping(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet = await two_measured_jobs(plane)
    a = fleet.a

    code, out, err = await gpuplane(plane, capsys, "jobs", "efficiency", a.job_id)
    assert code == 0, err
    assert out.split("\n")[0].split() == [
        "ATTEMPT", "STATE", "GPU", "PAID", "GPU", "TIME", "USED", "UTIL", "PEAK", "MEM",
        "CHARGED", "IDLE", "CREDITS",
    ]  # fmt: skip
    attempt = line_of(out, "1")
    assert attempt[1] == "SUCCEEDED"
    assert attempt[-5:] == ["42m00.0s", "70.0%", "3.0GiB", "2.000000", "0.600000"]
    assert "70.0% of the paid GPU time was used; 0.600000 credits paid for idle GPUs" in out
    total = line_of(out, "total")
    assert total[-5:] == ["42m00.0s", "70.0%", "3.0GiB", "2.000000", "0.600000"]

    code, out, err = await gpuplane(plane, capsys, "--json", "jobs", "efficiency", a.job_id)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["total"]["idle_micro_credits"] == "600000"
    assert shown["total"]["avg_gpu_utilization_basis_points"] == 7000
    assert shown["attempts"][0]["paid_gpu_time_ms"] == str(HOUR_MS)

    code, out, err = await gpuplane(plane, capsys, "jobs", "get", a.job_id)
    assert code == 0, err
    assert "GPU utilisation" in out
    assert "70.0% (peak memory 3.0GiB)" in out

    code, out, err = await gpuplane(plane, capsys, "ledger", "usage")
    assert code == 0, err
    assert out.split("\n")[0].split()[:1] == ["JOB"]
    assert line_of(out, a.job_id)[-2:] == ["70.0%", "2.000000"]
    assert line_of(out, fleet.b.job_id)[-2:] == ["30.0%", "1.000000"]
    assert "total: 1h30m GPU time (56.7% used), 3.000000 credits" in out

    code, out, err = await gpuplane(plane, capsys, "ledger", "usage", "--by", "gpu-model")
    assert code == 0, err
    assert out.split("\n")[0].split()[:3] == ["GPU", "MODEL", "JOBS"]
    assert "70.0%" in line_of(out, A100)
    assert "30.0%" in line_of(out, H100)

    code, out, err = await gpuplane(plane, capsys, "ledger", "usage", "--by", "provider")
    assert code == 0, err
    assert line_of(out, fleet.second_provider)[-2:] == ["30.0%", "1.000000"]
    assert line_of(out, plane.provider_tenant)[-2:] == ["70.0%", "2.000000"]

    for grouping in ("day", "month"):
        code, out, err = await gpuplane(plane, capsys, "ledger", "usage", "--by", grouping)
        assert code == 0, err
        (row,) = out.strip().split("\n")[1:-1]
        assert row.split()[-2:] == ["56.7%", "3.000000"]

    code, out, err = await gpuplane(plane, capsys, "ledger", "usage", "--by", "gpu")
    assert code == 2
    assert "--by" in err

    code, out, err = await gpuplane(plane, capsys, "ledger", "usage", "--platform")
    assert code == 4
    assert "all_tenants" in err
    code, out, err = await gpuplane(
        plane, capsys, "--json", "ledger", "usage", "--platform", key=plane.admin_key
    )
    assert code == 0, err
    report = json.loads(out)
    assert {r["job_id"] for r in report["rows"]} == {a.job_id, fleet.b.job_id}
    assert (report["total_fee_micro_credits"], report["total_cost_micro_credits"]) == (
        "300000",
        "3000000",
    )
    code, out, err = await gpuplane(
        plane, capsys, "ledger", "usage", "--platform", "--by", "provider", key=plane.admin_key
    )
    assert code == 0, err
    assert out.split("\n")[0].split()[-2:] == ["COST", "REVENUE"]
    assert line_of(out, fleet.second_provider)[-2:] == ["1.000000", "0.100000"]
    assert "3.000000 credits, 0.300000 platform revenue" in out
    # The operators' revenue: the 10 % fee of the 3 credits charged.
    code, out, err = await gpuplane(
        plane, capsys, "ledger", "balance", "--tenant", "platform", key=plane.admin_key
    )
    assert code == 0, err
    assert "platform:revenue:   0.300000" in out


async def test_efficiency_without_telemetry_says_unknown(
    plane: JobPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.controlplane.ledger.test_usage_efficiency import run_measured

    host = await start_host(plane, plane.provider_tenant, A100)
    try:
        job = await run_measured(plane, host, [], HOUR_MS // 2)
    finally:
        await host.close()
    code, out, err = await gpuplane(plane, capsys, "jobs", "efficiency", job.job_id)
    assert code == 0, err
    assert "no GPU telemetry covered this job yet: utilisation unknown" in out
    assert line_of(out, "total")[-3:] == ["-", "1.000000", "-"]
    code, out, err = await gpuplane(plane, capsys, "jobs", "get", job.job_id)
    assert "GPU utilisation" not in out
    code, out, err = await gpuplane(plane, capsys, "jobs", "efficiency", "job_missing")
    assert code == 3
    assert "job_missing" in err
    assert job.state == types_pb2.JOB_STATE_SUCCEEDED
