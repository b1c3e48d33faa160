"""scripts/bench's job_settlements_per_s run small: FINISHED reports of running jobs settled
through JobService.apply_report on PostgreSQL, every job then checked charged exactly once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench.jobsettle import MIN_JOBS, ROUND, round_size

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def test_a_short_run_makes_small_rounds() -> None:
    assert round_size(0.01) == MIN_JOBS
    assert round_size(0.1) == 200
    assert round_size(3) == ROUND


@pytest.mark.timeout(300)
def test_job_settlements_run_small_and_charge_each_job_once() -> None:
    done = subprocess.run(
        [str(SCRIPT), "--only", "job_settlements_per_s", "--json", "--duration", "0.01"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(results) == {"pg_tx", "job_settlements_per_s"}  # the floor runs first
    result = results["job_settlements_per_s"]
    # The figure raises (error set, no figure) unless every job SUCCEEDED, was charged its
    # cost exactly once (one CHARGE, one FEE, one RELEASE), its hold posted, the ledger
    # balanced, and no deadlock was seen.
    assert result["error"] is None
    assert result["figure"] > 0
    assert result["floor_name"] == "pg_tx"
    assert result["ratio"] == pytest.approx(result["figure"] / results["pg_tx"]["figure"])
    assert result["minimum"] == 3000
    details = result["details"]
    assert details["jobs"] == MIN_JOBS  # one round: a short run settles its first round
    assert details["rounds"] == 1
    assert details["clients"] == 32
    assert details["deadlocks"] == 0
