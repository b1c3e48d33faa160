"""`gpuplane admin pricing get|set --fee PERCENT`: the pricing policy; the fee at run time."""

from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation

from gpuplane.v1 import admin_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, Context
from gpuplane_cli.output import fields, print_json
from gpuplane_cli.units import format_credits


def register(admin: a.Subparsers, common: argparse.ArgumentParser) -> None:
    pricing = a.add_group(admin, "pricing", "the pricing policy: fee, price bounds, payouts")
    a.add_leaf(pricing, "get", get_cmd, "show the pricing policy", common)
    setter = a.add_leaf(pricing, "set", set_cmd, "admins: set the platform fee now", common)
    setter.add_argument(
        "--fee", type=fee_percent, required=True, help="percent of each charge, e.g. 10 or 12.5%%"
    )


def fee_percent(text: str) -> int:
    """A percentage ("12.5", "12.5%") as basis points; at most two decimals, 0 to 100."""
    try:
        percent = Decimal(text.strip().removesuffix("%"))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a percentage (e.g. 10 or 12.5%)"
        ) from None
    points = percent * 100
    if points != points.to_integral_value() or not 0 <= points <= 10_000:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be between 0 and 100 with at most two decimals"
        )
    return int(points)


def policy_block(policy: types_pb2.PricingPolicy) -> str:
    bp = policy.platform_fee_basis_points
    return fields(
        [
            ("Platform fee", f"{bp // 100}.{bp % 100:02d}% ({bp} basis points)"),
            ("Min price", format_credits(policy.min_price_per_gpu_hour_micro_credits)),
            ("Max price", format_credits(policy.max_price_per_gpu_hour_micro_credits)),
            ("Min payout", format_credits(policy.min_payout_micro_credits)),
        ]
    )


async def get_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    response = await client.call(client.admin.GetPricingPolicy, admin_pb2.GetPricingPolicyRequest())
    if ctx.json:
        print_json(response.policy)
    else:
        print(policy_block(response.policy))
    return EXIT_OK


async def set_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = admin_pb2.SetPricingPolicyRequest(
        policy=types_pb2.PricingPolicy(platform_fee_basis_points=args.fee)
    )
    response = await client.call(client.admin.SetPricingPolicy, request)
    if ctx.json:
        print_json(response.policy)
    else:
        print(policy_block(response.policy))
    return EXIT_OK
