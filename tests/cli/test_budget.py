"""`gpuplane ledger budget [set]`: the monthly spending limit in credits, its thresholds and
the month's spend; bad flags are named; a submit past the limit is refused in credits and
flags, and the dry run shows what the limit leaves."""

from __future__ import annotations

import pytest

from gpuplane_cli.budget import budget_block
from gpuplane_cli.main import main
from tests.cli.conftest import Cli, Served
from tests.cli.test_commands import new_consumer


def test_budget_show_set_and_a_refused_submit(cli: Cli, served: Served) -> None:
    admin = served.admin_key
    tenant, secret = new_consumer(cli, served)
    assert cli("ledger", "deposit", "200", "--tenant", tenant, key=admin).code == 0
    unset = cli("ledger", "budget", key=secret)
    assert unset.code == 0, unset.err
    assert "Monthly limit:  none" in unset.out
    assert "Spent:          0.000000" in unset.out

    made = cli("ledger", "budget", "set", "--monthly-limit", "150", "--alert-at", "90,50",
               key=secret)  # fmt: skip
    assert made.code == 0, made.err
    assert "Monthly limit:  150.000000" in made.out
    assert "Remaining:      150.000000" in made.out
    assert "Alerts at:      50%, 90%" in made.out
    as_json = cli("--json", "ledger", "budget", key=secret).json()
    assert as_json["monthly_limit_micro_credits"] == "150000000"  # type: ignore[index]

    # The first job holds the ceiling's 100 credits (no host matches): 50 are left.
    first = cli("jobs", "submit", "--image", "busybox", "--", "true", key=secret)
    assert first.code == 0, first.err
    quote = cli("jobs", "submit", "--image", "busybox", "--dry-run", "--", "true", key=secret)
    assert quote.code == 0, quote.err
    assert "Monthly limit left:  50.000000 of 150.000000" in quote.out
    expected = (
        "spending limit: the job needs a hold of 100.000000 credits and this month has "
        "50.000000 of its 150.000000-credit limit left (this month's charges and the holds of "
        "running or queued jobs count). To run it, submit with --budget 50.000000 or less, or "
        "raise the limit with `gpuplane ledger budget set --monthly-limit CREDITS`, or wait "
        "for running jobs to finish."
    )
    assert f"Submit would be refused: {expected}" in quote.out
    refused = cli("jobs", "submit", "--image", "busybox", "--", "true", key=secret)
    assert refused.code == 5
    assert refused.err == f"error: FAILED_PRECONDITION: {expected}\n"
    fits = cli("jobs", "submit", "--image", "busybox", "--budget", "50", "--", "true", key=secret)
    assert fits.code == 0, fits.err

    # An admin sets another tenant's limit; a consumer may not.
    other, other_secret = new_consumer(cli, served)
    by_admin = cli("ledger", "budget", "set", "--monthly-limit", "5", "--tenant", other,
                   key=admin)  # fmt: skip
    assert by_admin.code == 0, by_admin.err
    assert "Monthly limit:  5.000000" in cli("ledger", "budget", key=other_secret).out
    denied = cli("ledger", "budget", "set", "--monthly-limit", "1", "--tenant", other,
                 key=secret)  # fmt: skip
    assert denied.code == 4
    removed = cli("ledger", "budget", "set", "--monthly-limit", "0", key=secret)
    assert "Monthly limit:  none" in removed.out


def test_budget_flags_are_checked(cli: Cli, served: Served) -> None:
    _, secret = new_consumer(cli, served)
    no_limit = cli("ledger", "budget", "set", key=secret)
    assert no_limit.code == 2
    assert "--monthly-limit" in no_limit.err
    stray = cli("ledger", "budget", "--monthly-limit", "5", key=secret)
    assert stray.code == 2
    assert "ledger budget set" in stray.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--alert-at", "0"], "--alert-at: '0': each percentage must be 1 to 100"),
        (["--alert-at", "101"], "--alert-at: '101': each percentage must be 1 to 100"),
        (["--alert-at", "half"], "--alert-at: 'half' is not a list of percentages"),
        (["--monthly-limit", "-3"], "--monthly-limit"),
    ],
)
def test_bad_budget_values_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["ledger", "budget", "set", "--monthly-limit", "5", *flags], environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_block_lists_the_alerts() -> None:
    from google.protobuf.timestamp_pb2 import Timestamp
    from gpuplane.v1 import ledger_pb2

    start = Timestamp(seconds=1_796_083_200)  # 2026-12-01T00:00:00Z
    budget = ledger_pb2.Budget(
        tenant_id="t1",
        monthly_limit_micro_credits=10_000_000,
        alert_percents=[50, 80],
        month_start=start,
        spent_micro_credits=8_500_000,
        committed_micro_credits=1_000_000,
        remaining_micro_credits=500_000,
        alerts=[
            ledger_pb2.SpendingAlert(
                percent=50, spent_micro_credits=5_000_000, monthly_limit_micro_credits=10_000_000
            ),
            ledger_pb2.SpendingAlert(
                percent=80, spent_micro_credits=8_500_000, monthly_limit_micro_credits=10_000_000
            ),
        ],
    )
    text = budget_block(budget)
    assert "Month:          2026-12 (UTC)" in text
    assert "Used:           85.0%" in text
    lines = text.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("ALERT")))
    assert lines[header].split() == ["ALERT", "SPENT", "LIMIT", "RECORDED"]
    assert lines[header + 1].split()[:3] == ["50%", "5.000000", "10.000000"]
    assert lines[header + 2].split()[:3] == ["80%", "8.500000", "10.000000"]
