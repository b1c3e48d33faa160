"""`gpuplane ledger payouts list|paid|fail`: payouts from PENDING to PAID or back (FAILED)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gpuplane.v1 import ledger_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, Context, all_pages
from gpuplane_cli.output import enum_name, fields, print_json, table, when
from gpuplane_cli.units import format_credits


def register(ledger: a.Subparsers, common: argparse.ArgumentParser) -> None:
    payouts = a.add_group(ledger, "payouts", "payouts: list them; admins: mark paid or failed")
    listing = a.add_leaf(payouts, "list", list_cmd, "payouts, newest first", common)
    listing.add_argument("--tenant", default="", help="admins: another tenant")
    listing.add_argument("--all", action="store_true", help="admins: every tenant's")
    listing.add_argument(
        "--state",
        action="append",
        type=a.enum_arg(ledger_pb2.PayoutState, "state"),
        default=[],
        help="pending, paid or reversed (repeatable)",
    )
    listing.add_argument("--limit", type=a.non_negative, default=100, help="0 = all")
    paid = a.add_leaf(payouts, "paid", paid_cmd, "admins: the payment went through", common)
    paid.add_argument("payout_id")
    fail = a.add_leaf(
        payouts, "fail", fail_cmd, "admins: the payment failed; earnings back", common
    )
    fail.add_argument("payout_id")
    fail.add_argument("--reason", required=True)


def payout_block(payout: ledger_pb2.PayoutRecord) -> str:
    return fields(
        [
            ("Payout", payout.payout_id),
            ("Tenant", payout.tenant_id),
            ("Amount", format_credits(payout.amount_micro_credits)),
            ("Destination", payout.destination),
            ("State", enum_name(ledger_pb2.PayoutState, payout.state).lower()),
            ("Reason", payout.reason or None),
        ]
    )


async def list_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[ledger_pb2.PayoutRecord], str]:
        request = ledger_pb2.ListPayoutsRequest(
            tenant_id=args.tenant,
            all_tenants=args.all,
            states=args.state,
            page_size=size,
            page_token=token,
        )
        response = await client.call(client.ledger.ListPayouts, request)
        return response.payouts, response.next_page_token

    payouts, _ = await all_pages(fetch, args.limit)
    if ctx.json:
        print_json(payouts)
        return EXIT_OK
    print(
        table(
            ["PAYOUT", "TENANT", "STATE", "AMOUNT", "DESTINATION", "CREATED"],
            [
                (
                    p.payout_id,
                    p.tenant_id,
                    enum_name(ledger_pb2.PayoutState, p.state).lower(),
                    format_credits(p.amount_micro_credits),
                    p.destination,
                    when(p.created_at),
                )
                for p in payouts
            ],
        )
    )
    return EXIT_OK


async def paid_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = ledger_pb2.MarkPayoutPaidRequest(payout_id=args.payout_id)
    response = await client.call(client.ledger.MarkPayoutPaid, request)
    if ctx.json:
        print_json(response)
    else:
        print(payout_block(response.payout))
    return EXIT_OK


async def fail_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = ledger_pb2.FailPayoutRequest(payout_id=args.payout_id, reason=args.reason)
    response = await client.call(client.ledger.FailPayout, request)
    if ctx.json:
        print_json(response)
    else:
        print(payout_block(response.payout))
        back = format_credits(response.payout.amount_micro_credits)
        print(f"{back} credits back in earnings of {response.balance.tenant_id}")
    return EXIT_OK
