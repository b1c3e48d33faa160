"""`gpuplane ledger budget [set]`: a tenant's monthly spending limit, the month's spend
against it and the alerts its thresholds recorded; `set` changes the limit."""

from __future__ import annotations

import argparse

from gpuplane.v1 import jobs_pb2, ledger_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, EXIT_USAGE, CliError, Context
from gpuplane_cli.output import fields, print_json, table, when
from gpuplane_cli.units import format_credits


def _percents(text: str) -> list[int]:
    """--alert-at: comma-separated percentages of the limit, e.g. 50,80,100."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of percentages (e.g. 50,80,100)"
        ) from None
    if not values or any(not 1 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: each percentage must be 1 to 100")
    return values


def register(ledger: a.Subparsers, common: argparse.ArgumentParser) -> None:
    budget = a.add_leaf(
        ledger,
        "budget",
        budget_cmd,
        "the monthly spending limit and this month's spend; `set` changes the limit",
        common,
    )
    budget.add_argument("action", nargs="?", choices=("show", "set"), default="show")
    budget.add_argument("--tenant", default="", help="admins: another tenant")
    budget.add_argument(
        "--monthly-limit",
        type=a.credits_or_zero,
        help="with `set`: credits a calendar month (UTC) may spend; 0 removes the limit",
    )
    budget.add_argument(
        "--alert-at",
        type=_percents,
        default=[],
        help="with `set`: percentages of the limit that record an alert (default 50,80,100)",
    )


async def budget_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    if args.action == "set":
        if args.monthly_limit is None:
            raise CliError("`ledger budget set` needs --monthly-limit CREDITS", EXIT_USAGE)
        request = ledger_pb2.SetSpendingLimitRequest(
            tenant_id=args.tenant,
            monthly_limit_micro_credits=args.monthly_limit,
            alert_percents=args.alert_at,
        )
        budget = (await client.call(client.ledger.SetSpendingLimit, request)).budget
    else:
        if args.monthly_limit is not None or args.alert_at:
            raise CliError("--monthly-limit and --alert-at go with `ledger budget set`", EXIT_USAGE)
        request_get = ledger_pb2.GetBudgetRequest(tenant_id=args.tenant)
        budget = (await client.call(client.ledger.GetBudget, request_get)).budget
    if ctx.json:
        print_json(budget)
    else:
        print(budget_block(budget))
    return EXIT_OK


def budget_block(budget: ledger_pb2.Budget) -> str:
    limit = budget.monthly_limit_micro_credits
    month = budget.month_start.ToDatetime().strftime("%Y-%m")
    rows: list[tuple[str, str | None]] = [
        ("Tenant", budget.tenant_id),
        ("Month", f"{month} (UTC)"),
        ("Monthly limit", format_credits(limit) if limit else "none"),
        ("Spent", format_credits(budget.spent_micro_credits)),
        ("Held", format_credits(budget.committed_micro_credits)),
    ]
    if limit:
        rows += [
            ("Remaining", format_credits(budget.remaining_micro_credits)),
            ("Used", f"{budget.spent_micro_credits * 100 / limit:.1f}%"),
            ("Alerts at", ", ".join(f"{p}%" for p in budget.alert_percents)),
        ]
    text = fields(rows)
    if budget.alerts:
        text += "\n\n" + table(
            ["ALERT", "SPENT", "LIMIT", "RECORDED"],
            [
                (
                    f"{alert.percent}%",
                    format_credits(alert.spent_micro_credits),
                    format_credits(alert.monthly_limit_micro_credits),
                    when(alert.created_at),
                )
                for alert in budget.alerts
            ],
        )
    return text


def limit_shortfall(quote: jobs_pb2.Quote) -> str | None:
    """Why submit is (or would be) refused by the monthly spending limit, in credits and
    flags; None when the limit (if any) leaves room for the hold."""
    limit = quote.spending_limit_micro_credits
    left = quote.spending_limit_remaining_micro_credits
    if not limit or quote.hold_micro_credits <= left:
        return None
    fixes = [f"submit with --budget {format_credits(left)} or less"] if left > 0 else []
    fixes += [
        "raise the limit with `gpuplane ledger budget set --monthly-limit CREDITS`",
        "wait for running jobs to finish",
    ]
    return (
        f"spending limit: the job needs a hold of {format_credits(quote.hold_micro_credits)} "
        f"credits and this month has {format_credits(left)} of its {format_credits(limit)}-"
        "credit limit left (this month's charges and the holds of running or queued jobs "
        f"count). To run it, {', or '.join(fixes)}."
    )
