"""`gpuplane ledger balance|statement|deposit|payout|payouts|refund|usage|check|budget`:
credits, exactly."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import ledger_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli import budget, payouts
from gpuplane_cli.client import EXIT_CONFLICT, EXIT_OK, Context, all_pages
from gpuplane_cli.output import enum_name, fields, print_json, table, when
from gpuplane_cli.units import format_credits, format_duration_ms, format_utilization


def _time(text: str) -> datetime:
    """An ISO date or date-time; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO date (2026-11-23[T10:00])"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    ledger = a.add_group(subparsers, "ledger", "balances, statements, deposits and payouts")
    balance = a.add_leaf(ledger, "balance", get_balance, "show balances", common)
    balance.add_argument("--tenant", default="", help="admins: another tenant")
    statement = a.add_leaf(
        ledger, "statement", statement_cmd, "ledger entries, newest first", common
    )
    statement.add_argument("--tenant", default="")
    statement.add_argument("--job", default="")
    statement.add_argument(
        "--kind", action="append", type=a.enum_arg(types_pb2.TransferKind, "kind"), default=[]
    )
    statement.add_argument(
        "--account", action="append", type=a.enum_arg(types_pb2.AccountKind, "account"), default=[]
    )
    statement.add_argument("--since", type=_time)
    statement.add_argument("--until", type=_time)
    statement.add_argument("--limit", type=a.non_negative, default=100, help="0 = all")
    deposit = a.add_leaf(ledger, "deposit", deposit_cmd, "admins: credit a tenant", common)
    deposit.add_argument("amount", type=a.credits, help="credits, e.g. 100 or 12.5")
    deposit.add_argument("--tenant", required=True)
    deposit.add_argument("--reference", default="")
    deposit.add_argument("--idempotency-key", default="", help=IDEMPOTENCY_HELP)
    payout = a.add_leaf(ledger, "payout", payout_cmd, "providers: pay out earnings", common)
    payout.add_argument("amount", type=a.credits)
    payout.add_argument("--destination", required=True)
    payout.add_argument("--tenant", default="")
    payout.add_argument("--idempotency-key", default="", help=IDEMPOTENCY_HELP)
    refund = a.add_leaf(ledger, "refund", refund_cmd, "admins: refund a job's charges", common)
    refund.add_argument("job_id")
    refund.add_argument("amount", nargs="?", type=a.credits, help="default: everything charged")
    refund.add_argument("--reason", required=True)
    refund.add_argument("--idempotency-key", default="", help=IDEMPOTENCY_HELP)
    usage = a.add_leaf(
        ledger, "usage", usage_cmd, "GPU time, utilisation and cost per job or group", common
    )
    usage.add_argument("--tenant", default="")
    usage.add_argument("--job", default="")
    usage.add_argument(
        "--by",
        choices=list(GROUPINGS),
        default=None,
        help="one row per job (default), day, month, gpu-model or provider",
    )
    usage.add_argument(  # the earlier spelling, kept: --group-by day
        "--group-by", type=a.enum_arg(ledger_pb2.UsageGrouping, "grouping"), default=0
    )
    usage.add_argument(
        "--platform", action="store_true", help="admins: every tenant's usage (platform-wide)"
    )
    usage.add_argument("--since", type=_time)
    usage.add_argument("--until", type=_time)
    a.add_leaf(ledger, "check", check_cmd, "admins: verify every balance against transfers", common)
    payouts.register(ledger, common)
    budget.register(ledger, common)


GROUPINGS = {
    "job": ledger_pb2.USAGE_GROUPING_JOB,
    "day": ledger_pb2.USAGE_GROUPING_DAY,
    "month": ledger_pb2.USAGE_GROUPING_MONTH,
    "gpu-model": ledger_pb2.USAGE_GROUPING_GPU_MODEL,
    "provider": ledger_pb2.USAGE_GROUPING_PROVIDER,
}
IDEMPOTENCY_HELP = "retry-safe key; default: a new one (printed, to retry with)"


def idempotency_key(args: argparse.Namespace) -> str:
    """The given key, or a fresh one: money movements are always made retry-safe."""
    if not args.idempotency_key:
        args.idempotency_key = f"cli-{uuid.uuid4()}"
    return str(args.idempotency_key)


TENANT_KINDS = (
    types_pb2.ACCOUNT_KIND_AVAILABLE,
    types_pb2.ACCOUNT_KIND_HELD,
    types_pb2.ACCOUNT_KIND_EARNINGS,
)


def balance_block(balance: types_pb2.Balance) -> str:
    """A tenant's three balances (a negative earnings balance is a receivable); the platform
    its revenue and external accounts, each shard of the external one."""
    earnings = balance.earnings_micro_credits
    rows: list[tuple[str, str | None]] = [("Tenant", balance.tenant_id)]
    if not balance.accounts or any(x.kind in TENANT_KINDS for x in balance.accounts):
        rows += [
            ("Available", format_credits(balance.available_micro_credits)),
            ("Held", format_credits(balance.held_micro_credits)),
            ("Earnings", format_credits(earnings) + (" (receivable)" if earnings < 0 else "")),
        ]
    rows += [
        (x.account_id, format_credits(x.balance_micro_credits))
        for x in balance.accounts
        if x.kind not in TENANT_KINDS
    ]
    return fields(rows)


async def get_balance(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = ledger_pb2.GetBalanceRequest(tenant_id=args.tenant)
    balance = (await client.call(client.ledger.GetBalance, request)).balance
    if ctx.json:
        print_json(balance)
    else:
        print(balance_block(balance))
    return EXIT_OK


async def statement_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.LedgerEntry], str]:
        request = ledger_pb2.ListEntriesRequest(
            tenant_id=args.tenant,
            account_kinds=args.account,
            kinds=args.kind,
            job_id=args.job,
            start_time=_ts(args.since),
            end_time=_ts(args.until),
            page_size=size,
            page_token=token,
        )
        response = await client.call(client.ledger.ListEntries, request)
        return response.entries, response.next_page_token

    entries, _ = await all_pages(fetch, args.limit)
    if ctx.json:
        print_json(entries)
        return EXIT_OK
    print(
        table(
            ["TIME", "KIND", "ACCOUNT", "AMOUNT", "BALANCE", "JOB", "REFERENCE"],
            [
                (
                    when(e.created_at),
                    enum_name(types_pb2.TransferKind, e.kind).lower(),
                    enum_name(types_pb2.AccountKind, e.account_kind).lower(),
                    ("+" if e.amount_micro_credits > 0 else "")
                    + format_credits(e.amount_micro_credits),
                    format_credits(e.balance_after_micro_credits),
                    f"{e.job_id}/{e.attempt}" if e.job_id else "",
                    e.reference,
                )
                for e in entries
            ],
        )
    )
    return EXIT_OK


async def deposit_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = ledger_pb2.DepositRequest(
        tenant_id=args.tenant,
        amount_micro_credits=args.amount,
        reference=args.reference,
        idempotency_key=idempotency_key(args),
    )
    response = await client.call(client.ledger.Deposit, request)
    if ctx.json:
        print_json(response)
    else:
        print(f"deposited {format_credits(args.amount)} credits (transfer {response.transfer_id})")
        print(f"idempotency key: {args.idempotency_key}")
        print(balance_block(response.balance))
    return EXIT_OK


async def payout_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = ledger_pb2.PayoutRequest(
        tenant_id=args.tenant,
        amount_micro_credits=args.amount,
        destination=args.destination,
        idempotency_key=idempotency_key(args),
    )
    response = await client.call(client.ledger.Payout, request)
    if ctx.json:
        print_json(response)
    else:
        state = enum_name(ledger_pb2.PayoutState, response.state)
        print(f"payout {response.payout_id} of {format_credits(args.amount)} credits: {state}")
        print(f"idempotency key: {args.idempotency_key}")
        print(balance_block(response.balance))
    return EXIT_OK


async def refund_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = ledger_pb2.RefundJobRequest(
        job_id=args.job_id,
        amount_micro_credits=args.amount or 0,
        reason=args.reason,
        idempotency_key=idempotency_key(args),
    )
    response = await client.call(client.ledger.RefundJob, request)
    if ctx.json:
        print_json(response)
    else:
        refunded = format_credits(response.refunded_micro_credits)
        print(f"refunded {refunded} credits (transfer {response.transfer_id})")
        print(f"idempotency key: {args.idempotency_key}")
    return EXIT_OK


async def usage_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    grouping = GROUPINGS[args.by] if args.by else args.group_by
    rows: list[ledger_pb2.UsageRow] = []
    token = ""
    while True:
        request = ledger_pb2.GetUsageRequest(
            tenant_id=args.tenant,
            job_id=args.job,
            start_time=_ts(args.since),
            end_time=_ts(args.until),
            group_by=grouping,
            page_size=500,
            page_token=token,
            all_tenants=args.platform,
        )
        response = await client.call(client.ledger.GetUsage, request)
        rows.extend(response.rows)
        token = response.next_page_token
        if not token:
            break
    del response.rows[:]  # the last page's totals cover every page
    response.rows.extend(rows)
    if ctx.json:
        print_json(response)
        return EXIT_OK
    print(usage_table(rows, grouping, revenue=args.platform))
    print(usage_total(response, revenue=args.platform))
    return EXIT_OK


def usage_total(report: ledger_pb2.GetUsageResponse, *, revenue: bool) -> str:
    total_ms, used = report.total_gpu_time_ms, report.total_utilized_gpu_time_ms
    share = f" ({format_utilization(used * 10_000 // total_ms)} used)" if used and total_ms else ""
    line = (
        f"total: {format_duration_ms(total_ms)} GPU time{share}, "
        f"{format_credits(report.total_cost_micro_credits)} credits"
    )
    if revenue:
        line += f", {format_credits(report.total_fee_micro_credits)} platform revenue"
    return line


USAGE_HEADERS: dict[int, str] = {
    ledger_pb2.USAGE_GROUPING_GPU_MODEL: "GPU MODEL",
    ledger_pb2.USAGE_GROUPING_PROVIDER: "PROVIDER",
    ledger_pb2.USAGE_GROUPING_DAY: "DAY",
    ledger_pb2.USAGE_GROUPING_MONTH: "MONTH",
}


def usage_table(rows: Sequence[ledger_pb2.UsageRow], grouping: int, *, revenue: bool) -> str:
    first = USAGE_HEADERS.get(grouping, "JOB")

    def key(r: ledger_pb2.UsageRow) -> str:
        if grouping == ledger_pb2.USAGE_GROUPING_GPU_MODEL:
            return r.gpu_model or "-"
        if grouping == ledger_pb2.USAGE_GROUPING_PROVIDER:
            return r.provider_tenant_id or "-"
        return r.job_id or when(r.period_start)

    header = [first, "JOBS", "GPU", "GPU TIME", "USED", "UTIL", "COST"]
    return table(
        header + ["REVENUE"] if revenue else header,
        [
            (
                key(r),
                r.job_count,
                r.gpu_model or "-",
                format_duration_ms(r.gpu_time_ms),
                format_duration_ms(r.utilized_gpu_time_ms),
                format_utilization(r.avg_gpu_utilization_basis_points),
                format_credits(r.cost_micro_credits),
                *([format_credits(r.fee_micro_credits)] if revenue else []),
            )
            for r in rows
        ],
    )


async def check_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    response = await client.call(client.ledger.CheckLedger, ledger_pb2.CheckLedgerRequest())
    if ctx.json:
        print_json(response)
    else:
        verdict = "consistent" if response.consistent else "INCONSISTENT"
        print(
            f"ledger {verdict}: {response.account_count} accounts, {response.transfer_count} "
            f"transfers, balance sum {format_credits(response.balance_sum_micro_credits)}"
        )
        for m in response.mismatches:
            kind = enum_name(types_pb2.AccountKind, m.account_kind).lower()
            print(
                f"  {m.account_id} ({m.tenant_id} {kind}): stored "
                f"{format_credits(m.stored_micro_credits)}, recomputed "
                f"{format_credits(m.recomputed_micro_credits)}"
            )
    return EXIT_OK if response.consistent else EXIT_CONFLICT
