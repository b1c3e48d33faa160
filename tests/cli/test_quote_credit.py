"""`jobs submit --dry-run` shows the hold, the price it assumes and the caller's credit, and
says when the credit is short; a refused submit says so in credits, naming flags (never proto
fields or micro-credits)."""

from __future__ import annotations

from gpuplane.v1 import jobs_pb2, types_pb2

from gpuplane_cli.credit import duration_flag, shortfall
from tests.cli.conftest import Cli, Served
from tests.cli.test_commands import new_consumer

CREDIT = 1_000_000


def test_dry_run_and_refusal_name_flags_in_credits(cli: Cli, served: Served) -> None:
    tenant, secret = new_consumer(cli, served)
    deposit = cli("ledger", "deposit", "10", "--tenant", tenant, key=served.admin_key)
    assert deposit.code == 0, deposit.err
    # No host is registered with this control plane: the hold assumes the 100-credit ceiling.
    quote = cli("jobs", "submit", "--image", "busybox", "--dry-run", "--", "echo", "hi", key=secret)
    assert quote.code == 0, quote.err
    assert "Would hold:       100.000000" in quote.out
    assert "Hold assumes:     100.000000/GPU-hour" in quote.out
    assert "Available:        10.000000" in quote.out
    expected = (
        "insufficient credit: the job needs a hold of 100.000000 credits and you have "
        "10.000000 available. The hold is --max-duration 1h × 1 GPU × 100.000000 credits per "
        "GPU-hour, the pricing policy's ceiling, as no host matches the job now. Deposit more "
        "credits, or submit with --max-duration 6m, or a --max-price (see `gpuplane offers`), "
        "or --budget 10.000000 (the job stops when it is spent)."
    )
    assert f"Submit would be refused: {expected}" in quote.out

    refused = cli("jobs", "submit", "--image", "busybox", "--", "echo", "hi", key=secret)
    assert refused.code == 5
    assert refused.err == f"error: FAILED_PRECONDITION: {expected}\n"
    assert "spec." not in refused.err
    assert "micro" not in refused.err

    # The fix it names works, and the dry run then says nothing about credit.
    fixed = cli("jobs", "submit", "--image", "busybox", "--max-duration", "6m", "--dry-run",
                "--", "echo", "hi", key=secret)  # fmt: skip
    assert fixed.code == 0, fixed.err
    assert "Would hold:       10.000000" in fixed.out
    assert "refused" not in fixed.out
    held = cli("jobs", "submit", "--image", "busybox", "--max-duration", "6m", "--json",
               "--", "echo", "hi", key=secret)  # fmt: skip
    assert held.code == 0, held.err
    assert held.json()["hold_micro_credits"] == "10000000"  # type: ignore[index]

    # With nothing left, depositing is the only fix.
    broke = cli("jobs", "submit", "--image", "busybox", "--max-price", "1", "--", "true",
                key=secret)  # fmt: skip
    assert broke.code == 5
    assert "you have 0.000000 available" in broke.err
    assert "Deposit more credits." in broke.err  # nothing is left to fit a flag to


def test_shortfall_names_what_fits_the_credit() -> None:
    spec = types_pb2.JobSpec(gpu_count=4, max_duration_seconds=48 * 3600)
    market = jobs_pb2.Quote(
        matching_host_count=3,
        hold_micro_credits=4 * 48 * 2 * CREDIT,
        hold_price_per_gpu_hour_micro_credits=2 * CREDIT,
        available_micro_credits=100 * CREDIT,
    )
    assert shortfall(market, spec) == (
        "insufficient credit: the job needs a hold of 384.000000 credits and you have "
        "100.000000 available. The hold is --max-duration 48h × 4 GPUs × 2.000000 credits per "
        "GPU-hour, the dearest offer matching the job now. Deposit more credits, or submit "
        "with --max-duration 12h30m, or fewer --gpus, or --budget 100.000000 (the job stops "
        "when it is spent)."
    )
    market.available_micro_credits = market.hold_micro_credits
    assert shortfall(market, spec) is None
    budget = types_pb2.JobSpec(gpu_count=1, max_duration_seconds=60, budget_micro_credits=50)
    short = jobs_pb2.Quote(hold_micro_credits=50, available_micro_credits=20)
    assert shortfall(short, budget) == (
        "insufficient credit: the job needs a hold of 0.000050 credits and you have 0.000020 "
        "available. The hold is your --budget. Deposit more credits, or submit with --budget "
        "0.000020 or less."
    )


def test_duration_flag_reads_back_as_the_same_or_shorter_duration() -> None:
    from gpuplane_cli.units import parse_duration

    for seconds in (1, 59, 60, 61, 3599, 3600, 3660, 45_000, 172_800):
        flag = duration_flag(seconds)
        assert seconds - 60 < parse_duration(flag) <= seconds, (seconds, flag)
