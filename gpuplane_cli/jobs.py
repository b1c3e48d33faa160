"""`gpuplane jobs submit|list|get|cancel`: building job specs and showing jobs."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import grpc
from gpuplane.v1 import jobs_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli import budget, bulk, credit, data, efficiency, follow, verify
from gpuplane_cli.client import EXIT_OK, CliError, Context, all_pages, env_flag, exit_code_for
from gpuplane_cli.output import enum_name, fields, print_json, print_listing, table, when
from gpuplane_cli.units import (
    format_bytes,
    format_credits,
    format_duration_ms,
    format_utilization,
    parse_duration,
)

DEFAULT_MAX_DURATION = "1h"


SUBMIT_EPILOG = """\
Everything after `--` is the container's command and arguments, as with
`docker run IMAGE COMMAND ...` (use --entrypoint to replace the entrypoint).

examples:
  gpuplane jobs submit --image busybox --max-duration 6m --wait -- echo hello
  gpuplane jobs submit --image ghcr.io/me/train:1 --gpus 8 --min-vram 80 \\
      --max-price 2.5 --budget 40 --input ./data.tar --env EPOCHS=3 \\
      --label team=nlp -- python train.py
  gpuplane jobs submit --image busybox --dry-run    # the quote: what it holds
  gpuplane apply job.yaml                           # the options from a file"""


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    jobs = a.add_group(subparsers, "jobs", "submit, follow and collect GPU jobs")
    submit = a.add_leaf(
        jobs,
        "submit",
        submit_job,
        "submit a containerised job",
        common,
        usage="%(prog)s --image IMAGE [options] [-- COMMAND [ARG ...]]",
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _submit_options(submit)
    listing = a.add_leaf(jobs, "list", list_jobs, "list your jobs, newest first", common)
    listing.add_argument(
        "--state",
        action="append",
        type=a.enum_arg(types_pb2.JobState, "state"),
        default=[],
        help="only jobs in this state (repeatable): queued, running, succeeded, ...",
    )
    listing.add_argument("--label", action="append", type=a.key_value, default=[])
    listing.add_argument("--tenant", default="", help="admins: another tenant's jobs")
    listing.add_argument("--limit", type=a.non_negative, default=50, help="0 = all (default 50)")
    for flag, edge in (("--since", "at or after"), ("--until", "before")):
        listing.add_argument(
            flag, type=a.moment, metavar="WHEN",
            help=f"only jobs created {edge} WHEN: a duration ago (2h, 1d) or a time "
            "(2026-11-23T10:00:00Z; without an offset, UTC)",
        )  # fmt: skip
    get = a.add_leaf(jobs, "get", get_job, "show one job with its attempts", common)
    get.add_argument("job_id")
    bulk.add_cancel(jobs, common)
    follow.register(jobs, common)
    efficiency.register(jobs, common)
    verify.register(jobs, common)


def _submit_options(p: argparse.ArgumentParser) -> None:
    """What a job runs and what it may spend; then where (_placement_options)."""
    p.add_argument(
        "--image", required=True, help="container image reference, e.g. busybox or ghcr.io/o/r:1"
    )
    p.add_argument("--entrypoint", help="replace the image's entrypoint, e.g. /bin/sh")
    resource_options(p)
    p.add_argument(
        "--max-duration",
        type=a.duration,
        default=parse_duration(DEFAULT_MAX_DURATION),
        help=f"run-time limit per attempt: 600, 10m, 2h (default {DEFAULT_MAX_DURATION})",
    )
    p.add_argument("--max-price", type=a.credits, help="max credits per GPU-hour, e.g. 2.5")
    p.add_argument(
        "--budget",
        type=a.credits,
        help="spend cap in credits: the job is stopped once it has run as long as this pays "
        "for at its host's price (its outputs are kept; it is charged exactly the budget), "
        "e.g. 10",
    )
    p.add_argument(
        "--env",
        action="append",
        type=a.key_value,
        default=[],
        metavar="K=V",
        help="an environment variable of the container (repeatable), e.g. --env SEED=42",
    )
    p.add_argument(
        "--label",
        action="append",
        type=a.key_value,
        default=[],
        metavar="K=V",
        help="a label of the job (repeatable; `jobs list --label` and `jobs cancel --label` "
        "select by it), e.g. --label team=nlp",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="KEY[:PATH]",
        help="an input under /input (repeatable): a key of your input area, or a local file "
        "(starting with ./, ../, / or ~) to upload first",
    )
    p.add_argument("--network", action="store_true", help="outbound network (default: none)")
    p.add_argument(
        "--idempotency-key",
        default="",
        help="a key of yours: submitting again with it answers the first job instead of "
        "making a second (safe retries), e.g. train-2026-12-06",
    )
    p.add_argument("--dry-run", action="store_true", help="quote only: create nothing")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    _placement_options(p)


def resource_options(p: argparse.ArgumentParser) -> None:
    """What a job needs of a host: GPUs, their kind, CPU and memory."""
    p.add_argument(
        "--gpus", type=a.non_negative, default=1, help="GPUs on one host (default 1), e.g. 8"
    )
    p.add_argument(
        "--gpu-model",
        action="append",
        default=[],
        help="an allowed GPU model as `gpuplane offers` names it (repeatable), "
        "e.g. 'NVIDIA H100 80GB HBM3'",
    )
    p.add_argument(
        "--min-vram",
        type=a.non_negative,
        default=0,
        metavar="GIB",
        help="only GPUs with at least this much memory, e.g. 40",
    )
    p.add_argument(
        "--min-compute-capability",
        default="",
        metavar="X.Y",
        help="only GPUs of at least this CUDA compute capability, e.g. 8.0",
    )
    p.add_argument("--cpus", type=a.cpus, help="CPU limit: 2, 0.5 or 250m")
    p.add_argument("--memory", type=a.size, help="memory limit: 512m, 16g")
    p.add_argument("--shm-size", type=a.size, help="/dev/shm size: 1g")


def submit_defaults() -> argparse.Namespace:
    """What `jobs submit` options are when no flag is given (`gpuplane apply` starts here)."""
    parser = argparse.ArgumentParser(add_help=False)
    _submit_options(parser)
    return parser.parse_args(["--image", ""])


def _placement_options(p: argparse.ArgumentParser) -> None:
    """Where and how often a job may run: host constraints, placement, retries."""
    p.add_argument(
        "--host-label",
        action="append",
        type=a.key_value,
        default=[],
        metavar="K=V",
        help="only hosts with this label (repeatable), e.g. --host-label tier=gold",
    )
    p.add_argument(
        "--location", action="append", default=[], help="an allowed location, e.g. eu-west"
    )
    p.add_argument(
        "--min-reliability",
        type=a.reliability,
        default=0,
        metavar="PERCENT",
        help="only hosts at least this reliable (completed attempts, recent ones weighing "
        "most; see `gpuplane offers`), e.g. 95",
    )
    p.add_argument(
        "--priority",
        type=int,
        default=0,
        help="among your queued jobs, higher runs first (default 0), e.g. 10",
    )
    p.add_argument(
        "--placement",
        type=a.enum_arg(types_pb2.PlacementPolicy, "placement"),
        default=0,
        help="how a host is chosen: cheapest, balanced (price, reliability, load), pack "
        "(fill used hosts first) or spread (default: the control plane's)",
    )
    p.add_argument(
        "--max-retries",
        type=a.non_negative,
        default=None,
        help="retries after the first attempt (default 2): infrastructure faults always, "
        "user failures only with --retry-on-exit-code",
    )
    p.add_argument(
        "--retry-on-exit-code",
        type=int,
        action="append",
        default=[],
        metavar="CODE",
        help="retry (charged) an attempt that exits with CODE; repeatable",
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


def build_spec(args: argparse.Namespace, ctx: Context) -> types_pb2.JobSpec:
    """The JobSpec that `jobs submit` flags describe."""
    allow_simulated = args.allow_simulated
    if allow_simulated is None:
        allow_simulated = env_flag(ctx.environ, "GPUPLANE_ALLOW_SIMULATED")
    spec = types_pb2.JobSpec(
        image=args.image,
        args=list(getattr(args, "job_command", [])),
        env=dict(args.env),
        gpu_count=args.gpus,
        gpu_models=args.gpu_model,
        min_vram_gib=args.min_vram,
        min_compute_capability=args.min_compute_capability,
        cpu_millicores=args.cpus or 0,
        memory_bytes=args.memory or 0,
        shm_bytes=args.shm_size or 0,
        network=types_pb2.NETWORK_MODE_BRIDGE if args.network else types_pb2.NETWORK_MODE_NONE,
        max_duration_seconds=args.max_duration,
        max_price_per_gpu_hour_micro_credits=args.max_price or 0,
        budget_micro_credits=args.budget or 0,
        priority=args.priority,
        labels=dict(args.label),
        max_retries=args.max_retries,
        retry_on_exit_codes=args.retry_on_exit_code,
        placement_policy=args.placement,
        locations=args.location,
        host_labels=dict(args.host_label),
        allow_simulated=allow_simulated,
        allow_unverified=args.allow_unverified,
        min_reliability_permille=args.min_reliability,
    )
    if args.entrypoint:
        spec.command.append(args.entrypoint)
    for item in args.input:
        key, _, path = item.partition(":")
        spec.inputs.append(types_pb2.JobInput(key=key, path=path))
    return spec


async def submit_job(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    spec = build_spec(args, ctx)
    await data.upload_local_inputs(ctx, spec.inputs, args.dry_run)
    request = jobs_pb2.SubmitJobRequest(
        spec=spec, idempotency_key=args.idempotency_key, dry_run=args.dry_run
    )
    try:
        response = await client.call(client.jobs.SubmitJob, request)
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.FAILED_PRECONDITION and not args.dry_run:
            await _explain_refusal(ctx, spec)
        raise
    if args.dry_run:
        if ctx.json:
            print_json(response.quote)
        else:
            print(show_quote(response.quote, spec))
        return EXIT_OK
    job = response.job
    if not args.wait:
        if ctx.json:
            print_json(job)
        else:
            print(f"job {job.job_id} {enum_name(types_pb2.JobState, job.state)}", end="")
            print(f", holding {format_credits(job.hold_micro_credits)} credits")
        return EXIT_OK
    if not ctx.json:
        print(f"job {job.job_id} submitted, holding {format_credits(job.hold_micro_credits)}")
    return await follow.wait_for_job(ctx, job.job_id)


async def _explain_refusal(ctx: Context, spec: types_pb2.JobSpec) -> None:
    """A refused submit: when a dry run shows the hold exceeds the caller's credit, says so
    in credits and flags (the server's message names spec fields)."""
    client = ctx.client()
    request = jobs_pb2.SubmitJobRequest(spec=spec, dry_run=True)
    try:
        quote = (await client.call(client.jobs.SubmitJob, request)).quote
    except grpc.RpcError:
        return  # the original error says what it can
    short = credit.shortfall(quote, spec) or budget.limit_shortfall(quote)
    if short is not None:
        code = grpc.StatusCode.FAILED_PRECONDITION
        raise CliError(f"{code.name}: {short}", exit_code_for(code))


def show_quote(quote: jobs_pb2.Quote, spec: types_pb2.JobSpec) -> str:
    hold_price = quote.hold_price_per_gpu_hour_micro_credits
    lines = [
        fields(
            [
                ("Matching hosts", quote.matching_host_count),
                ("Price/GPU-hour", _price_range(quote)),
                ("Would hold", format_credits(quote.hold_micro_credits)),
                ("Hold assumes", f"{format_credits(hold_price)}/GPU-hour" if hold_price else None),
                ("Available", format_credits(quote.available_micro_credits)),
                ("Monthly limit left", _limit_left(quote)),
                ("Estimated start", when(quote.estimated_start) or "not on the current market"),
                ("Explanation", quote.explanation or None),
            ]
        )
    ]
    short = credit.shortfall(quote, spec) or budget.limit_shortfall(quote)
    if short is not None:
        lines += ["", f"Submit would be refused: {short}"]
    if quote.offers:
        from gpuplane_cli.hosts import offers_table

        lines += ["", offers_table(quote.offers)]
    return "\n".join(lines)


def _limit_left(quote: jobs_pb2.Quote) -> str | None:
    limit = quote.spending_limit_micro_credits
    if not limit:
        return None
    left = format_credits(quote.spending_limit_remaining_micro_credits)
    return f"{left} of {format_credits(limit)}"


def _price_range(quote: jobs_pb2.Quote) -> str:
    low = quote.min_price_per_gpu_hour_micro_credits
    high = quote.max_price_per_gpu_hour_micro_credits
    if not low and not high:
        return "-"
    if low == high:
        return format_credits(low)
    return f"{format_credits(low)} – {format_credits(high)}"


async def list_jobs(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.Job], str]:
        request = jobs_pb2.ListJobsRequest(
            states=args.state,
            labels=dict(args.label),
            tenant_id=args.tenant,
            created_after=bulk.timestamp(args.since),
            created_before=bulk.timestamp(args.until),
            page_size=size,
            page_token=token,
        )
        response = await client.call(client.jobs.ListJobs, request)
        return response.jobs, response.next_page_token

    jobs, more = await all_pages(fetch, args.limit)
    print_listing(jobs, jobs_table, json_out=ctx.json, more=more, limit=args.limit, noun="jobs")
    return EXIT_OK


def jobs_table(jobs: Sequence[types_pb2.Job]) -> str:
    return table(
        ["JOB", "STATE", "IMAGE", "GPUS", "HOST", "CREATED", "CHARGED"],
        [
            (
                job.job_id,
                enum_name(types_pb2.JobState, job.state),
                job.spec.image,
                job.spec.gpu_count,
                job.host_id or "-",
                when(job.created_at),
                format_credits(job.charged_micro_credits),
            )
            for job in jobs
        ],
    )


async def get_job(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    response = await client.call(client.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=args.job_id))
    if ctx.json:
        print_json(response.job)
    else:
        print(show_job(response.job))
    return EXIT_OK


def show_job(job: types_pb2.Job) -> str:
    spec = job.spec
    state = enum_name(types_pb2.JobState, job.state)
    command = [*spec.command, *spec.args]
    lines = [
        fields(
            [
                ("Job", job.job_id),
                ("State", f"{state} ({job.state_reason})" if job.state_reason else state),
                ("Image", spec.image),
                ("Command", " ".join(command) if command else None),
                (
                    "GPUs",
                    f"{spec.gpu_count}"
                    + (f" of {', '.join(spec.gpu_models)}" if spec.gpu_models else ""),
                ),
                ("Host", job.host_id or None),
                ("GPU UUIDs", ", ".join(job.gpu_uuids) or None),
                ("Attempt", job.attempt),
                ("Exit code", job.exit_code if job.HasField("exit_code") else None),
                ("Created", when(job.created_at)),
                ("Started", when(job.started_at) or None),
                ("Finished", when(job.finished_at) or None),
                ("Price/GPU-hour", format_credits(job.price_per_gpu_hour_micro_credits)),
                ("Held", format_credits(job.hold_micro_credits)),
                ("Charged", format_credits(job.charged_micro_credits)),
                ("Run time", format_duration_ms(job.usage.run_time_ms)),
                ("GPU time", format_duration_ms(job.usage.gpu_time_ms)),
                ("GPU utilisation", _utilization(job.usage)),
                (
                    "Labels",
                    ", ".join(f"{k}={v}" for k, v in sorted(job.spec.labels.items())) or None,
                ),
            ]
        )
    ]
    if job.attempts:
        lines += ["", attempts_table(job)]
    return "\n".join(lines)


def _utilization(usage: types_pb2.JobUsage) -> str | None:
    """The job's mean GPU utilisation and peak memory; None (not shown) without telemetry."""
    if not usage.avg_gpu_utilization_basis_points and not usage.peak_gpu_memory_bytes:
        return None
    return (
        f"{format_utilization(usage.avg_gpu_utilization_basis_points)} "
        f"(peak memory {format_bytes(usage.peak_gpu_memory_bytes)})"
    )


def attempts_table(job: types_pb2.Job) -> str:
    return table(
        ["ATTEMPT", "STATE", "HOST", "STARTED", "FINISHED", "EXIT", "CHARGED", "REASON"],
        [
            (
                att.attempt,
                attempt_state(att),
                att.host_id or "-",
                when(att.started_at),
                when(att.finished_at),
                att.exit_code if att.HasField("exit_code") else "",
                format_credits(att.charged_micro_credits),
                att.reason,
            )
            for att in job.attempts
        ],
    )


def attempt_state(attempt: types_pb2.JobAttempt) -> str:
    """LOST, RUNNING, ...: the attempt's own state, or its job state from earlier servers."""
    if attempt.attempt_state:
        return enum_name(types_pb2.AttemptState, attempt.attempt_state)
    return enum_name(types_pb2.JobState, attempt.state)
