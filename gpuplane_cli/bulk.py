"""`gpuplane jobs cancel` of several jobs: by id, or the caller's jobs matching labels."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import jobs_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli import follow
from gpuplane_cli.client import EXIT_OK, EXIT_USAGE, CliError, Context, all_pages, exit_code_for
from gpuplane_cli.output import enum_name, print_json

# What a cancel can still change: every state but the end states.
CANCELLABLE = frozenset(
    state
    for state in types_pb2.JobState.values()
    if state != types_pb2.JOB_STATE_UNSPECIFIED and state not in follow.TERMINAL
)


def add_cancel(jobs: a.Subparsers, common: argparse.ArgumentParser) -> None:
    cancel = a.add_leaf(
        jobs,
        "cancel",
        cancel_jobs,
        "cancel jobs by id, or your unfinished jobs with --label (idempotent)",
        common,
        epilog="With several ids each is cancelled and reported on its own line; the exit "
        "code is non-zero if any failed. With --label the matching unfinished jobs are "
        "counted first, and cancelled after a confirmation (or --yes).",
    )
    cancel.add_argument("job_id", nargs="*", metavar="JOB_ID")
    cancel.add_argument("--reason", default="")
    cancel.add_argument(
        "--label", action="append", type=a.key_value, default=[], metavar="K=V",
        help="cancel your jobs carrying this label (repeatable: all of them)",
    )  # fmt: skip
    cancel.add_argument(
        "--state", action="append", type=a.enum_arg(types_pb2.JobState, "state"), default=[],
        help="with --label: only jobs in this state (repeatable; default every unfinished one)",
    )  # fmt: skip
    cancel.add_argument("--yes", "-y", action="store_true", help="do not ask to confirm")


def timestamp(value: datetime | None) -> Timestamp | None:
    """A datetime from --since/--until as a Timestamp (None when the flag was not given)."""
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


async def cancel_jobs(args: argparse.Namespace, ctx: Context) -> int:
    if args.job_id and (args.label or args.state):
        raise CliError("give job ids or --label (with --state), not both", EXIT_USAGE)
    if args.state and not args.label:
        raise CliError("--state selects among --label's jobs: give --label K=V too", EXIT_USAGE)
    if not args.job_id and not args.label:
        raise CliError("name the jobs to cancel: JOB_ID ... or --label K=V", EXIT_USAGE)
    if len(args.job_id) == 1:
        job = await _cancel(ctx, args.job_id[0], args.reason)
        _report(ctx, [job])
        return EXIT_OK
    ids = args.job_id or await _matching(args, ctx)
    if not ids:
        return EXIT_OK
    return await _cancel_each(ctx, ids, args.reason)


async def _matching(args: argparse.Namespace, ctx: Context) -> list[str]:
    """The caller's unfinished jobs with all of --label (and one of --state), counted and
    confirmed before anything is cancelled."""
    states = [s for s in args.state if s in CANCELLABLE] if args.state else sorted(CANCELLABLE)
    if not states:
        raise CliError("--state: those jobs have ended; only unfinished ones cancel", EXIT_USAGE)
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[types_pb2.Job], str]:
        request = jobs_pb2.ListJobsRequest(
            states=states, labels=dict(args.label), page_size=size, page_token=token
        )
        response = await client.call(client.jobs.ListJobs, request)
        return response.jobs, response.next_page_token

    jobs, _ = await all_pages(fetch)
    labels = ", ".join(f"{k}={v}" for k, v in args.label)
    print(f"{len(jobs)} unfinished job(s) with {labels}", file=sys.stderr)
    if jobs and not args.yes:
        _confirm(len(jobs))
    return [job.job_id for job in jobs]


def _confirm(count: int) -> None:
    if not sys.stdin.isatty():
        raise CliError(f"not cancelling {count} job(s) without --yes (stdin is not a terminal)")
    print(f"cancel {count} job(s)? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise CliError("nothing cancelled")


async def _cancel(ctx: Context, job_id: str, reason: str) -> types_pb2.Job:
    client = ctx.client()
    request = jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason)
    return (await client.call(client.jobs.CancelJob, request)).job


async def _cancel_each(ctx: Context, ids: Sequence[str], reason: str) -> int:
    """Cancels one after the other, one line each; a failure does not stop the rest."""
    done: list[types_pb2.Job] = []
    failed: list[tuple[str, grpc.RpcError]] = []
    for job_id in ids:
        try:
            job = await _cancel(ctx, job_id, reason)
        except grpc.RpcError as exc:
            failed.append((job_id, exc))
            print(f"job {job_id}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            continue
        done.append(job)
        if not ctx.json:
            _report(ctx, [job])
    if ctx.json:
        print_json(done)
    if failed:
        names = ", ".join(job_id for job_id, _ in failed)
        message = f"{len(failed)} of {len(ids)} cancels failed: {names}"
        raise CliError(message, exit_code_for(failed[0][1].code()))
    return EXIT_OK


def _report(ctx: Context, jobs: Sequence[types_pb2.Job]) -> None:
    for job in jobs:
        if ctx.json:
            print_json(job)
        elif job.state in follow.TERMINAL:
            print(f"job {job.job_id} {enum_name(types_pb2.JobState, job.state)}")
        else:
            # On a host it runs until its daemon stops it: the cancel is asked for, not done.
            state = enum_name(types_pb2.JobState, job.state)
            print(f"job {job.job_id} cancel requested (still {state} until its host stops it)")
