"""`gpuplane services deploy|list|get|scale|stop|start|delete|logs|keys`: long-running services."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from gpuplane.v1 import services_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli import service_keys
from gpuplane_cli.client import EXIT_OK, CliError, Context, env_flag
from gpuplane_cli.follow import job_logs
from gpuplane_cli.output import enum_name, fields, print_json, print_shown, table, when
from gpuplane_cli.units import format_credits

DEPLOY_EPILOG = """\
Each replica runs the image (its default command, or COMMAND after --) serving on --port; the
control plane keeps --replicas of them running, spread over hosts, replaces one that ends
(backing off after failures) and bills each per second at its host's price.

examples:
  gpuplane services deploy web --image busybox --port 8080 --replicas 3 --gpus-per-replica 0 \\
      --health-path / -- httpd -f -p 8080
  gpuplane services scale web 5
  gpuplane services logs web -f"""


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    group = a.add_group(subparsers, "services", "long-running services: replicas kept running")
    deploy = a.add_leaf(
        group,
        "deploy",
        deploy_service,
        "deploy a service of N replicas",
        common,
        usage="%(prog)s NAME --image IMAGE --port PORT [options] [-- COMMAND [ARG ...]]",
        epilog=DEPLOY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _deploy_options(deploy)
    listing = a.add_leaf(group, "list", list_services, "list your services", common)
    listing.add_argument("--tenant", default="", help="admins: another tenant's services")
    listing.add_argument("--all", action="store_true", help="deleted services too")
    get = a.add_leaf(group, "get", get_service, "show one service and its replicas", common)
    get.add_argument("service", metavar="NAME")
    scale = a.add_leaf(group, "scale", scale_service, "set how many replicas run", common)
    scale.add_argument("service", metavar="NAME")
    scale.add_argument("replicas", metavar="N", type=a.non_negative)
    for name, handler, what in (
        ("stop", stop_service, "stop every replica (kept, for start)"),
        ("start", start_service, "start a stopped service again"),
        ("delete", delete_service, "stop every replica and delete it (its name is free)"),
    ):
        leaf = a.add_leaf(group, name, handler, what, common)
        leaf.add_argument("service", metavar="NAME")
    logs = a.add_leaf(group, "logs", service_logs, "a replica's logs", common)
    logs.add_argument("service", metavar="NAME")
    logs.add_argument(
        "--replica", default="", metavar="R", help="its id (default: the newest running one)"
    )
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming")
    logs.add_argument("--tail", type=a.non_negative, default=0, help="only the last N lines")
    service_keys.register(group, common)


def _deploy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--image", required=True, help="the container image, e.g. busybox")
    p.add_argument("--port", type=int, required=True, help="the port it serves on, e.g. 8080")
    p.add_argument("--replicas", type=int, default=1, help="how many (default 1, at most 32)")
    p.add_argument(
        "--gpus-per-replica", type=a.non_negative, default=1, help="GPUs each (default 1)"
    )
    p.add_argument(
        "--health-path", default="", help="HTTP path probed, e.g. /healthz (default: TCP)"
    )
    p.add_argument("--gpu-model", action="append", default=[], help="an allowed GPU model")
    p.add_argument("--min-vram", type=a.non_negative, default=0, metavar="GIB")
    p.add_argument("--cpus", type=a.cpus, help="CPU limit: 2, 0.5 or 250m")
    p.add_argument("--memory", type=a.size, help="memory limit: 512m, 16g")
    p.add_argument("--max-price", type=a.credits, help="max credits per GPU-hour, e.g. 2.5")
    p.add_argument("--network", action="store_true", help="outbound network (default: none)")
    p.add_argument("--env", action="append", type=a.key_value, default=[], metavar="K=V")
    p.add_argument("--label", action="append", type=a.key_value, default=[], metavar="K=V")
    p.add_argument("--location", action="append", default=[], help="an allowed location")
    p.add_argument("--host-label", action="append", type=a.key_value, default=[], metavar="K=V")
    p.add_argument(
        "--allow-simulated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="allow hosts with simulated GPUs (default: env GPUPLANE_ALLOW_SIMULATED=1)",
    )
    p.add_argument("--allow-unverified", action="store_true", help="allow unverified hosts")
    p.add_argument("--idempotency-key", default="", help="a key of yours, for safe retries")


def build_request(args: argparse.Namespace, ctx: Context) -> services_pb2.DeployServiceRequest:
    if args.replicas < 0:
        raise CliError("--replicas: must be 0 to 32", 2)
    command = list(getattr(args, "job_command", []) or [])  # after `--` (main.split_command)
    allow_simulated = args.allow_simulated
    if allow_simulated is None:
        allow_simulated = env_flag(ctx.environ, "GPUPLANE_ALLOW_SIMULATED")
    spec = types_pb2.JobSpec(
        image=args.image,
        args=command,
        env=dict(args.env),
        gpu_count=args.gpus_per_replica,
        gpu_models=args.gpu_model,
        min_vram_gib=args.min_vram,
        cpu_millicores=args.cpus or 0,
        memory_bytes=args.memory or 0,
        network=types_pb2.NETWORK_MODE_BRIDGE if args.network else types_pb2.NETWORK_MODE_NONE,
        max_price_per_gpu_hour_micro_credits=args.max_price or 0,
        labels=dict(args.label),
        locations=args.location,
        host_labels=dict(args.host_label),
        allow_simulated=allow_simulated,
        allow_unverified=args.allow_unverified,
    )
    return services_pb2.DeployServiceRequest(
        name=args.name,
        spec=spec,
        port=max(args.port, 0),
        replicas=args.replicas,
        health_path=args.health_path,
        idempotency_key=args.idempotency_key,
    )


def services_table(services: Sequence[services_pb2.Service]) -> str:
    return table(
        ["NAME", "STATE", "IMAGE", "PORT", "READY", "RUNNING", "DESIRED", "REPLACED", "CHARGED"],
        [
            (
                s.name,
                enum_name(services_pb2.ServiceState, s.state),
                s.image,
                s.port,
                s.ready_replicas,
                s.running_replicas,
                s.desired_replicas,
                s.restarts,
                format_credits(s.charged_micro_credits),
            )
            for s in services
        ],
    )


def show_service(s: services_pb2.Service) -> str:
    head = fields(
        [
            ("Service", f"{s.name} ({s.service_id})"),
            ("State", enum_name(services_pb2.ServiceState, s.state)),
            ("Reason", s.state_reason or None),
            ("Image", s.image),
            ("Port", s.port),
            ("Health", s.health_path or "TCP connect"),
            ("GPUs/replica", s.gpus_per_replica),
            (
                "Replicas",
                f"{s.ready_replicas} ready, {s.running_replicas} running, "
                f"{s.desired_replicas} desired",
            ),
            ("Replacements", s.restarts),
            ("Last failure", s.last_failure or None),
            ("Backing off until", when(s.backoff_until) or None),
            ("Charged", format_credits(s.charged_micro_credits)),
            ("Created", when(s.created_at)),
        ]
    )
    rows = table(
        ["REPLICA", "STATE", "READY", "RESTARTS", "HOST", "STARTED", "CHARGED"],
        [
            (
                r.replica_id,
                enum_name(types_pb2.JobState, r.state),
                "yes" if r.ready else "no",
                r.restarts,
                r.host_id or "-",
                when(r.started_at) or "-",
                format_credits(r.charged_micro_credits),
            )
            for r in s.replicas
        ],
    )
    return f"{head}\n\n{rows}"


def _print(ctx: Context, shown: services_pb2.Service) -> int:
    print_shown(shown, show_service, json_out=ctx.json)
    return EXIT_OK


async def deploy_service(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    reply = await client.call(client.services.DeployService, build_request(args, ctx))
    return _print(ctx, reply.service)


async def list_services(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.ListServicesRequest(tenant_id=args.tenant, include_deleted=args.all)
    services = (await client.call(client.services.ListServices, request)).services
    if ctx.json:
        print_json(services)
    else:
        print(services_table(services))
    return EXIT_OK


async def get_service(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.GetServiceRequest(service=args.service)
    return _print(ctx, (await client.call(client.services.GetService, request)).service)


async def scale_service(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.ScaleServiceRequest(service=args.service, replicas=args.replicas)
    return _print(ctx, (await client.call(client.services.ScaleService, request)).service)


async def stop_service(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.StopServiceRequest(service=args.service)
    return _print(ctx, (await client.call(client.services.StopService, request)).service)


async def start_service(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.StartServiceRequest(service=args.service)
    return _print(ctx, (await client.call(client.services.StartService, request)).service)


async def delete_service(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.DeleteServiceRequest(service=args.service)
    return _print(ctx, (await client.call(client.services.DeleteService, request)).service)


def pick_replica(service: services_pb2.Service, wanted: str) -> str:
    """The replica whose logs are shown: `wanted` (its id), or the newest running one, or
    the newest of all."""
    ids = [r.replica_id for r in service.replicas]
    if wanted:
        if wanted not in ids:
            raise CliError(f"--replica: {service.name} has no replica {wanted!r}", 2)
        return wanted
    running = [r.replica_id for r in service.replicas if r.state == types_pb2.JOB_STATE_RUNNING]
    if running or ids:
        return (running or ids)[0]
    raise CliError(f"NAME: {service.name} has no replica yet", 1)


async def service_logs(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = services_pb2.GetServiceRequest(service=args.service)
    service = (await client.call(client.services.GetService, request)).service
    job = argparse.Namespace(
        job_id=pick_replica(service, args.replica),
        attempt=0,
        stream=types_pb2.LOG_STREAM_UNSPECIFIED,
        follow=args.follow,
        tail=args.tail,
    )
    return await job_logs(job, ctx)
