"""`gpuplane sessions create|list|get|extend|done|destroy` and `gpuplane ssh-config`."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from gpuplane.v1 import sessions_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli import jobs
from gpuplane_cli.client import EXIT_OK, CliError, Context, all_pages, env_flag
from gpuplane_cli.output import (
    enum_name,
    fields,
    print_json,
    print_listing,
    print_shown,
    table,
    when,
)
from gpuplane_cli.units import format_credits, format_duration_ms

DEFAULT_IMAGE = "ubuntu:24.04"
CREATE_EPILOG = """\
--hours takes fractions (0.5 = 30 minutes, 0.01 = 36 seconds); a session lasts at most 12
hours from its start, extensions included. Its container runs the image's default command
(or --command) on a terminal with open stdin, so a shell image stays up: reach it with
`gpuplane shell SESSION`, `gpuplane port-forward SESSION 8888:8888`, or ssh through
`gpuplane ssh-config SESSION`.

examples:
  gpuplane sessions create --gpus 1 --gpu-model H100 --hours 2 --ssh-key ~/.ssh/id_ed25519.pub
  gpuplane sessions create --image busybox --gpus 0 --hours 0.25 --max-price 1.5
  gpuplane sessions extend ses_3f9a --hours 1
  gpuplane sessions done ses_3f9a"""


def hours(text: str) -> float:
    """--hours: a number of hours, fractions allowed (the server checks 1 s … 12 h)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of hours, 0 < H <= 12")
    return value


def seconds_of(value: float) -> int:
    return round(value * 3600)


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    group = a.add_group(subparsers, "sessions", "interactive GPU sessions, billed by the second")
    create = a.add_leaf(
        group,
        "create",
        create_session,
        "provision a session for a number of hours",
        common,
        epilog=CREATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _create_options(create)
    listing = a.add_leaf(group, "list", list_sessions, "list your sessions, newest first", common)
    listing.add_argument(
        "--state",
        action="append",
        type=a.enum_arg(types_pb2.JobState, "state"),
        default=[],
        help="only sessions in this state (repeatable): queued, running, succeeded, ...",
    )
    listing.add_argument("--tenant", default="", help="admins: another tenant's sessions")
    listing.add_argument("--limit", type=a.non_negative, default=50, help="0 = all (default 50)")
    get = a.add_leaf(group, "get", get_session, "show one session", common)
    get.add_argument("session_id", metavar="SESSION")
    extend = a.add_leaf(group, "extend", extend_session, "add time (and its hold)", common)
    extend.add_argument("session_id", metavar="SESSION")
    extend.add_argument("--hours", type=hours, required=True, help="hours to add, e.g. 1.5")
    done = a.add_leaf(group, "done", finish_session, "end it: charged the time it ran", common)
    done.add_argument("session_id", metavar="SESSION")
    destroy = a.add_leaf(group, "destroy", destroy_session, "destroy it (cancelled)", common)
    destroy.add_argument("session_id", metavar="SESSION")
    destroy.add_argument("--reason", default="", help="said in its state reason")
    ssh = a.add_leaf(
        subparsers, "ssh-config", ssh_config, "an OpenSSH Host entry for a session", common
    )
    ssh.add_argument("session_id", metavar="SESSION")
    ssh.add_argument(
        "--ssh-key", default="", metavar="FILE", help="the key (or its .pub) ssh offers"
    )


def _create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hours", type=hours, required=True, help="how long: 1 to 12, e.g. 2")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"default {DEFAULT_IMAGE}")
    p.add_argument(
        "--command", nargs="+", default=[], help="run this instead of the image's command"
    )
    jobs.resource_options(p)  # --gpus, --gpu-model, --min-vram, --cpus, --memory, ...
    p.add_argument("--max-price", type=a.credits, help="max credits per GPU-hour, e.g. 2.5")
    p.add_argument(
        "--ssh-key",
        action="append",
        default=[],
        metavar="FILE",
        help="a public key file written to /root/.ssh/authorized_keys (repeatable)",
    )
    p.add_argument("--network", action="store_true", help="outbound network (default: none)")
    p.add_argument("--env", action="append", type=a.key_value, default=[], metavar="K=V")
    p.add_argument("--label", action="append", type=a.key_value, default=[], metavar="K=V")
    p.add_argument("--location", action="append", default=[], help="an allowed location")
    p.add_argument("--host-label", action="append", type=a.key_value, default=[], metavar="K=V")
    p.add_argument(
        "--min-reliability",
        type=a.reliability,
        default=0,
        metavar="PERCENT",
        help="only hosts at least this reliable, e.g. 95",
    )
    p.add_argument(
        "--allow-simulated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow hosts with simulated GPUs (default: env GPUPLANE_ALLOW_SIMULATED=1)",
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="allow hosts that have not passed hardware verification (default: verified only)",
    )
    p.add_argument("--idempotency-key", default="", help="a key of yours, for safe retries")


def _read_keys(paths: Sequence[str]) -> list[str]:
    keys = []
    for path in paths:
        try:
            text = Path(path).expanduser().read_text()
        except OSError as exc:
            raise CliError(f"--ssh-key {path}: {exc.strerror or exc}", 2) from None
        keys += [line.strip() for line in text.splitlines() if line.strip()]
    return keys


def build_request(args: argparse.Namespace, ctx: Context) -> sessions_pb2.CreateSessionRequest:
    allow_simulated = args.allow_simulated
    if allow_simulated is None:
        allow_simulated = env_flag(ctx.environ, "GPUPLANE_ALLOW_SIMULATED")
    spec = types_pb2.JobSpec(
        image=args.image,
        args=args.command,
        env=dict(args.env),
        gpu_count=args.gpus,
        gpu_models=args.gpu_model,
        min_vram_gib=args.min_vram,
        min_compute_capability=args.min_compute_capability,
        cpu_millicores=args.cpus or 0,
        memory_bytes=args.memory or 0,
        shm_bytes=args.shm_size or 0,
        network=types_pb2.NETWORK_MODE_BRIDGE if args.network else types_pb2.NETWORK_MODE_NONE,
        max_price_per_gpu_hour_micro_credits=args.max_price or 0,
        labels=dict(args.label),
        locations=args.location,
        host_labels=dict(args.host_label),
        allow_simulated=allow_simulated,
        allow_unverified=args.allow_unverified,
        min_reliability_permille=args.min_reliability,
    )
    return sessions_pb2.CreateSessionRequest(
        spec=spec,
        duration_seconds=seconds_of(args.hours),
        ssh_public_keys=_read_keys(args.ssh_key),
        idempotency_key=args.idempotency_key,
    )


async def create_session(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    reply = await client.call(client.sessions.CreateSession, build_request(args, ctx))
    made = reply.session
    if ctx.json:
        print_json(made)
    else:
        state = enum_name(types_pb2.JobState, made.state)
        held = format_credits(made.hold_micro_credits)
        print(f"session {made.session_id} {state}, holding {held} credits")
    return EXIT_OK


async def list_sessions(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[sessions_pb2.Session], str]:
        request = sessions_pb2.ListSessionsRequest(
            states=args.state, tenant_id=args.tenant, page_size=size, page_token=token
        )
        response = await client.call(client.sessions.ListSessions, request)
        return response.sessions, response.next_page_token

    sessions, more = await all_pages(fetch, args.limit)
    print_listing(
        sessions, sessions_table, json_out=ctx.json, more=more, limit=args.limit, noun="sessions"
    )
    return EXIT_OK


def sessions_table(sessions: Sequence[sessions_pb2.Session]) -> str:
    return table(
        ["SESSION", "STATE", "IMAGE", "GPUS", "HOST", "EXPIRES", "CHARGED"],
        [
            (
                s.session_id,
                enum_name(types_pb2.JobState, s.state),
                s.image,
                s.gpu_count,
                s.host_id or "-",
                when(s.expires_at) or "-",
                format_credits(s.charged_micro_credits),
            )
            for s in sessions
        ],
    )


def show_session(s: sessions_pb2.Session) -> str:
    return fields(
        [
            ("Session", s.session_id),
            ("State", enum_name(types_pb2.JobState, s.state)),
            ("Reason", s.state_reason or None),
            ("Image", s.image),
            ("GPUs", f"{s.gpu_count} on {s.host_id}" if s.host_id else s.gpu_count),
            ("Duration", format_duration_ms(s.duration_seconds * 1000)),
            ("Created", when(s.created_at)),
            ("Started", when(s.started_at) or None),
            ("Expires", when(s.expires_at) or None),
            ("Warning", s.warning or None),
            ("Finished", when(s.finished_at) or None),
            ("Destroyed", when(s.destroyed_at) or None),
            ("Run time", format_duration_ms(s.run_time_ms) if s.run_time_ms else None),
            ("Price/GPU-hour", format_credits(s.price_per_gpu_hour_micro_credits)),
            ("Held", format_credits(s.hold_micro_credits)),
            ("Charged", format_credits(s.charged_micro_credits)),
            ("SSH keys", len(s.ssh_public_keys) or None),
        ]
    )


def _print(ctx: Context, shown: sessions_pb2.Session) -> int:
    print_shown(shown, show_session, json_out=ctx.json)
    return EXIT_OK


async def get_session(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = sessions_pb2.GetSessionRequest(session_id=args.session_id)
    return _print(ctx, (await client.call(client.sessions.GetSession, request)).session)


async def extend_session(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = sessions_pb2.ExtendSessionRequest(
        session_id=args.session_id, duration_seconds=seconds_of(args.hours)
    )
    return _print(ctx, (await client.call(client.sessions.ExtendSession, request)).session)


async def finish_session(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = sessions_pb2.FinishSessionRequest(session_id=args.session_id)
    return _print(ctx, (await client.call(client.sessions.FinishSession, request)).session)


async def destroy_session(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = sessions_pb2.DestroySessionRequest(session_id=args.session_id, reason=args.reason)
    return _print(ctx, (await client.call(client.sessions.DestroySession, request)).session)


def ssh_entry(session_id: str, key_file: str = "", context: str = "") -> str:
    """The OpenSSH `Host` entry of a session: ssh reaches its port 22 through the control
    plane (`gpuplane port-forward --stdio`), no inbound port on the provider's host."""
    short = session_id.removeprefix("ses_")[:8]
    chosen = f" --context {context}" if context else ""
    lines = [
        f"Host gpuplane-{short}",
        f"  HostName {session_id}",
        "  User root",
        f"  ProxyCommand gpuplane{chosen} port-forward --stdio {session_id} 22",
        "  StrictHostKeyChecking accept-new",
        "  UserKnownHostsFile ~/.ssh/gpuplane_known_hosts",
    ]
    if key_file:
        private = key_file.removesuffix(".pub")
        lines += [f"  IdentityFile {private}", "  IdentitiesOnly yes"]
    return "\n".join(lines)


async def ssh_config(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = sessions_pb2.GetSessionRequest(session_id=args.session_id)
    found = (await client.call(client.sessions.GetSession, request)).session
    print(ssh_entry(found.session_id, args.ssh_key, getattr(args, "context", "") or ""))
    return EXIT_OK
