"""`gpuplane hosts list|get|update|drain|undrain` and `gpuplane offers`: the supply side."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gpuplane.v1 import registry_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, EXIT_USAGE, CliError, Context, all_pages
from gpuplane_cli.output import enum_name, fields, gpu_summary, print_json, table, when
from gpuplane_cli.units import format_bytes, format_credits


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    hosts = a.add_group(subparsers, "hosts", "registered GPU hosts (providers and admins)")
    listing = a.add_leaf(hosts, "list", list_hosts, "list hosts", common)
    listing.add_argument(
        "--state", action="append", type=a.enum_arg(types_pb2.HostState, "state"), default=[]
    )
    listing.add_argument("--provider", default="", help="admins: another provider's hosts")
    get = a.add_leaf(hosts, "get", get_host, "show a host, its GPUs and their telemetry", common)
    get.add_argument("host_id")
    update = a.add_leaf(
        hosts, "update", update_host, "change a host's price, location or labels", common
    )
    update.add_argument("host_id")
    update.add_argument("--price-per-gpu-hour", type=a.credits, metavar="CREDITS")
    update.add_argument("--location")
    update.add_argument(
        "--label", action="append", type=a.key_value, metavar="K=V", help="replaces all labels"
    )
    update.add_argument("--clear-labels", action="store_true", help="remove every label")
    drain = a.add_leaf(hosts, "drain", drain_host, "stop placing new jobs on a host", common)
    drain.add_argument("host_id")
    drain.add_argument("--reason", default="")
    undrain = a.add_leaf(hosts, "undrain", undrain_host, "take new jobs on a host again", common)
    undrain.add_argument("host_id")
    revoke = a.add_leaf(
        hosts,
        "revoke",
        revoke_host,
        "admins: cut a host off for good (credential, NATS user); its jobs are retried",
        common,
    )
    revoke.add_argument("host_id")
    revoke.add_argument("--reason", default="")

    offers = a.add_leaf(
        subparsers, "offers", list_offers, "free GPUs for sale, cheapest first", common
    )
    offers.add_argument("--gpu-type", default="", help="model substring, e.g. h100")
    offers.add_argument("--min-vram", type=a.non_negative, default=0, metavar="GIB")
    offers.add_argument("--max-price", type=a.credits, help="credits per GPU-hour")
    offers.add_argument("--min-gpus", type=a.non_negative, default=0)
    offers.add_argument("--location", default="")
    offers.add_argument("--label", action="append", type=a.key_value, default=[], metavar="K=V")
    offers.add_argument("--exclude-simulated", action="store_true")
    offers.add_argument(
        "--verified-only", action="store_true", help="only hosts that passed hardware verification"
    )


async def list_hosts(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.Host], str]:
        request = registry_pb2.ListHostsRequest(
            states=args.state, provider_tenant_id=args.provider, page_size=size, page_token=token
        )
        response = await client.call(client.registry.ListHosts, request)
        return response.hosts, response.next_page_token

    hosts, _ = await all_pages(fetch)
    if ctx.json:
        print_json(hosts)
        return EXIT_OK
    print(
        table(
            ["HOST", "HOSTNAME", "STATE", "GPUS", "PRICE/GPU-H", "LOCATION", "JOBS", "HEARTBEAT"],
            [
                (
                    h.host_id,
                    h.hostname,
                    enum_name(types_pb2.HostState, h.state)
                    + (" (simulated)" if h.simulated else ""),
                    gpu_summary(h.gpus),
                    format_credits(h.price_per_gpu_hour_micro_credits),
                    h.location or "-",
                    len(h.job_ids),
                    when(h.last_heartbeat_at),
                )
                for h in hosts
            ],
        )
    )
    return EXIT_OK


async def get_host(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = registry_pb2.GetHostRequest(host_id=args.host_id)
    host = (await client.call(client.registry.GetHost, request)).host
    if ctx.json:
        print_json(host)
        return EXIT_OK
    print(show_host(host))
    return EXIT_OK


def show_host(h: types_pb2.Host) -> str:
    state = enum_name(types_pb2.HostState, h.state)
    head = fields(
        [
            ("Host", h.host_id),
            ("Hostname", h.hostname),
            ("Provider", h.provider_tenant_id),
            ("State", f"{state} ({h.drain_reason})" if h.drain_reason else state),
            (
                "Revoked",
                f"{when(h.revoked_at)} ({h.revoked_reason})" if h.HasField("revoked_at") else None,
            ),
            ("Simulated GPUs", "yes" if h.simulated else None),
            (
                "Verified",
                f"yes, {when(h.verified_at)}"
                if h.verified
                else f"no ({h.verification_reason or 'not probed yet'})",
            ),
            ("Location", h.location or None),
            ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(h.labels.items())) or None),
            ("Price/GPU-hour", format_credits(h.price_per_gpu_hour_micro_credits)),
            ("Reliability", f"{h.reliability_permille / 10:.1f}%"),
            ("Registered", when(h.registered_at)),
            ("Last heartbeat", when(h.last_heartbeat_at) or "never"),
            ("Daemon", h.daemon_version or None),
            ("Driver / CUDA", f"{h.driver_version or '-'} / {h.cuda_driver_version or '-'}"),
            ("CPUs / memory", f"{h.cpu_count} / {format_bytes(h.memory_bytes)}"),
            ("Jobs", ", ".join(h.job_ids) or None),
        ]
    )
    gpus = table(
        ["#", "GPU", "VRAM", "UTIL", "MEM USED", "TEMP", "POWER", "HEALTH", "JOB"],
        [
            (
                g.index,
                g.name,
                format_bytes(g.memory_total_bytes),
                f"{g.latest.utilization_gpu_percent}%" if g.HasField("latest") else "-",
                format_bytes(g.latest.memory_used_bytes) if g.HasField("latest") else "-",
                f"{g.latest.temperature_celsius}C" if g.HasField("latest") else "-",
                f"{g.latest.power_draw_milliwatts / 1000:.0f}W" if g.HasField("latest") else "-",
                "ok" if g.healthy else f"UNHEALTHY {g.unhealthy_reason}",
                g.job_id or "-",
            )
            for g in h.gpus
        ],
    )
    return f"{head}\n\n{gpus}"


async def update_host(args: argparse.Namespace, ctx: Context) -> int:
    """Jobs placed from now on use the new price; running ones keep theirs."""
    if args.label and args.clear_labels:
        raise CliError("--label and --clear-labels: give one or the other", EXIT_USAGE)
    request = registry_pb2.UpdateHostRequest(
        host_id=args.host_id,
        replace_labels=bool(args.label) or args.clear_labels,
        labels=dict(args.label or []),
    )
    if args.price_per_gpu_hour is not None:
        request.price_per_gpu_hour_micro_credits = args.price_per_gpu_hour
    if args.location is not None:
        request.location = args.location
    if args.price_per_gpu_hour is None and args.location is None and not request.replace_labels:
        raise CliError(
            "nothing to change: give --price-per-gpu-hour, --location or --label", EXIT_USAGE
        )
    client = ctx.client()
    host = (await client.call(client.registry.UpdateHost, request)).host
    if ctx.json:
        print_json(host)
    else:
        labels = ",".join(f"{k}={v}" for k, v in sorted(host.labels.items())) or "-"
        price = format_credits(host.price_per_gpu_hour_micro_credits)
        print(
            f"host {host.host_id}: {price}/GPU-hour, location {host.location or '-'}, "
            f"labels {labels}"
        )
    return EXIT_OK


async def drain_host(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = registry_pb2.DrainHostRequest(host_id=args.host_id, reason=args.reason)
    host = (await client.call(client.registry.DrainHost, request)).host
    return _print_state(ctx, host)


async def undrain_host(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = registry_pb2.UndrainHostRequest(host_id=args.host_id)
    host = (await client.call(client.registry.UndrainHost, request)).host
    return _print_state(ctx, host)


async def revoke_host(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = registry_pb2.RevokeHostRequest(host_id=args.host_id, reason=args.reason)
    host = (await client.call(client.registry.RevokeHost, request)).host
    return _print_state(ctx, host)


def _print_state(ctx: Context, host: types_pb2.Host) -> int:
    if ctx.json:
        print_json(host)
    else:
        revoked = f" (revoked: {host.revoked_reason})" if host.HasField("revoked_at") else ""
        print(f"host {host.host_id} {enum_name(types_pb2.HostState, host.state)}{revoked}")
    return EXIT_OK


async def list_offers(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.Offer], str]:
        request = registry_pb2.ListOffersRequest(
            gpu_type=args.gpu_type,
            min_vram_gib=args.min_vram,
            max_price_per_gpu_hour_micro_credits=args.max_price or 0,
            min_gpu_count=args.min_gpus,
            location=args.location,
            labels=dict(args.label),
            exclude_simulated=args.exclude_simulated,
            verified_only=args.verified_only,
            page_size=size,
            page_token=token,
        )
        response = await client.call(client.registry.ListOffers, request)
        return response.offers, response.next_page_token

    offers, _ = await all_pages(fetch)
    if ctx.json:
        print_json(offers)
    else:
        print(offers_table(offers))
    return EXIT_OK


def offers_table(offers: Sequence[types_pb2.Offer]) -> str:
    return table(
        ["HOST", "GPU", "VRAM", "FREE", "PRICE/GPU-H", "LOCATION", "RELIABILITY", "VERIFIED"],
        [
            (
                o.host_id,
                o.gpu_model + (" (simulated)" if o.simulated else ""),
                f"{o.vram_gib}GiB",
                f"{o.free_gpu_count}/{o.total_gpu_count}",
                format_credits(o.price_per_gpu_hour_micro_credits),
                o.location or "-",
                f"{o.reliability_permille / 10:.1f}%",
                "yes" if o.verified else "no",
            )
            for o in offers
        ],
    )
