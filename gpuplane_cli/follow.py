"""`gpuplane jobs watch|logs|results` and `submit --wait`: following a job and collecting output."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import grpc
from gpuplane.v1 import jobs_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_ERROR, EXIT_JOB_FAILED, EXIT_OK, CliError, Context
from gpuplane_cli.data import Progress
from gpuplane_cli.output import enum_name, print_json, print_json_line, table, when
from gpuplane_cli.units import format_bytes, format_credits, format_duration_ms
from gpuplane_cli.verify import save_provenance

TERMINAL = frozenset(
    {
        types_pb2.JOB_STATE_SUCCEEDED,
        types_pb2.JOB_STATE_FAILED,
        types_pb2.JOB_STATE_CANCELLED,
        types_pb2.JOB_STATE_TIMED_OUT,
        types_pb2.JOB_STATE_REJECTED,
    }
)
# Before these end, a job has no logs: `jobs logs` says so instead of printing nothing.
_UNSTARTED = frozenset(
    {types_pb2.JOB_STATE_QUEUED, types_pb2.JOB_STATE_SCHEDULED, types_pb2.JOB_STATE_STARTING}
)
_DOWNLOAD_CHUNK = 1 << 20
# Lines of stderr `submit --wait` prints when a job did not succeed.
STDERR_TAIL_LINES = 20
# A watch stream that ends before the job does is resumed this many times.
MAX_RESUMES = 5


def register(jobs: a.Subparsers, common: argparse.ArgumentParser) -> None:
    watch = a.add_leaf(jobs, "watch", watch_job, "stream a job's state changes", common)
    watch.add_argument("job_id")
    watch.add_argument("--after-seq", type=a.non_negative, default=0)
    logs = a.add_leaf(jobs, "logs", job_logs, "print a job's logs", common)
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep streaming while it runs")
    logs.add_argument("--attempt", type=a.non_negative, default=0, help="0 = the current one")
    logs.add_argument("--stream", type=a.enum_arg(types_pb2.LogStream, "stream"), default=0)
    logs.add_argument("--tail", type=a.non_negative, default=0, help="only the last N lines")
    results = a.add_leaf(jobs, "results", job_results, "list or download a job's outputs", common)
    results.add_argument("job_id")
    results.add_argument("--attempt", type=a.non_negative, default=0)
    results.add_argument("--download", metavar="DIR", help="download into DIR, checking sha256")


def event_line(event: types_pb2.JobEvent) -> str:
    state = enum_name(types_pb2.JobState, event.state)
    parts = [when(event.time), f"attempt {event.attempt}", state]
    if event.HasField("exit_code"):
        parts.append(f"exit {event.exit_code}")
    if event.reason:
        parts.append(event.reason)
    return "  ".join(parts)


async def stream_events(ctx: Context, job_id: str, after_seq: int, *, show: bool = True) -> int:
    """Follows the job's events until a terminal one and returns that state, printing each
    (`show`). A stream that ends early or drops is resumed after the last event seen. On a
    terminal, a ticker shows how long the current state has lasted."""
    client = ctx.client()
    ticker = _Ticker() if show and sys.stderr.isatty() and not ctx.json else None
    resumes = 0
    try:
        while True:
            request = jobs_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq)
            call = client.jobs.WatchJob(request, metadata=client.metadata)
            try:
                async for event in call:
                    after_seq = max(after_seq, event.seq)
                    if ticker:
                        ticker.clear(enum_name(types_pb2.JobState, event.state))
                    if show and ctx.json:
                        print_json_line(event)
                    elif show:
                        print(event_line(event), flush=True)
                    if event.state in TERMINAL:
                        return int(event.state)
                    if ticker:
                        ticker.resume()
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.UNAVAILABLE or resumes >= MAX_RESUMES:
                    raise
            finally:
                call.cancel()
            resumes += 1
            if resumes > MAX_RESUMES:
                job = await client.call(client.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id))
                return int(job.job.state)
            await asyncio.sleep(min(2.0, 0.2 * resumes))
    finally:
        if ticker:
            ticker.stop()


async def watch_job(args: argparse.Namespace, ctx: Context) -> int:
    final = await stream_events(ctx, args.job_id, args.after_seq)
    return EXIT_OK if final == types_pb2.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED


async def wait_for_job(ctx: Context, job_id: str) -> int:
    """`submit --wait`: state changes as they happen, then the job's outcome, its stdout and
    its result files. Exits non-zero unless the job SUCCEEDED."""
    await stream_events(ctx, job_id, 0, show=not ctx.json)
    client = ctx.client()
    job = (await client.call(client.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id))).job
    if ctx.json:
        print_json(job)
    else:
        print(summary(job))
        try:
            await _print_logs(ctx, job_id)
            if job.state == types_pb2.JOB_STATE_SUCCEEDED:
                objects = await _results(ctx, job_id, 0)
                if objects.objects:
                    print(results_table(objects))
            else:
                await _print_stderr_tail(ctx, job_id)
        except grpc.RpcError as exc:
            print(f"(output not available: {exc.code().name}: {exc.details()})", file=sys.stderr)
    return EXIT_OK if job.state == types_pb2.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED


def summary(job: types_pb2.Job) -> str:
    state = enum_name(types_pb2.JobState, job.state)
    parts = [f"job {job.job_id} {state}"]
    if job.HasField("exit_code"):
        parts.append(f"exit code {job.exit_code}")
    parts.append(f"ran {format_duration_ms(job.usage.run_time_ms)}")
    parts.append(f"charged {format_credits(job.charged_micro_credits)} credits")
    text = ", ".join(parts)
    return f"{text}\nreason: {job.state_reason}" if job.state_reason else text


async def _print_logs(ctx: Context, job_id: str) -> None:
    client = ctx.client()
    request = jobs_pb2.StreamLogsRequest(job_id=job_id, stream=types_pb2.LOG_STREAM_STDOUT)
    call = client.jobs.StreamLogs(request, metadata=client.metadata, timeout=30)
    print("--- stdout ---")
    async for chunk in call:
        sys.stdout.buffer.write(chunk.data)
    sys.stdout.flush()
    print("--- end of stdout ---")


async def _print_stderr_tail(ctx: Context, job_id: str) -> None:
    """The last lines of the job's stderr, on stderr: why it failed, as the job said it."""
    client = ctx.client()
    request = jobs_pb2.StreamLogsRequest(
        job_id=job_id, stream=types_pb2.LOG_STREAM_STDERR, tail_lines=STDERR_TAIL_LINES
    )
    call = client.jobs.StreamLogs(request, metadata=client.metadata, timeout=30)
    data = b"".join([chunk.data async for chunk in call])
    if not data:
        return
    lines = data.splitlines(keepends=True)[-STDERR_TAIL_LINES:]
    sys.stdout.flush()
    print(f"--- last {len(lines)} lines of stderr ---", file=sys.stderr)
    sys.stderr.flush()
    sys.stderr.buffer.write(b"".join(lines))
    if not lines[-1].endswith(b"\n"):
        sys.stderr.buffer.write(b"\n")
    sys.stderr.flush()
    print("--- end of stderr ---", file=sys.stderr)


async def job_logs(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = jobs_pb2.StreamLogsRequest(
        job_id=args.job_id,
        attempt=args.attempt,
        stream=args.stream,
        follow=args.follow,
        tail_lines=args.tail,
    )
    if args.follow:
        await _say_if_unstarted(ctx, args.job_id, "waiting for it to start")
    call = client.jobs.StreamLogs(request, metadata=client.metadata)
    chunks = 0
    try:
        async for chunk in call:
            chunks += 1
            if ctx.json:
                print_json_line(chunk)
                continue
            out = sys.stderr if chunk.stream == types_pb2.LOG_STREAM_STDERR else sys.stdout
            out.buffer.write(chunk.data)
            out.flush()
    finally:
        call.cancel()
    if not chunks and not args.follow:
        await _say_if_unstarted(ctx, args.job_id, "no logs yet")
    return EXIT_OK


async def _say_if_unstarted(ctx: Context, job_id: str, what: str) -> None:
    """`job X is queued: no logs yet` on stderr for a job that has not started (empty logs
    would otherwise look like a job that printed nothing)."""
    client = ctx.client()
    job = (await client.call(client.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id))).job
    if job.state in _UNSTARTED:
        state = enum_name(types_pb2.JobState, job.state).lower()
        print(f"job {job_id} is {state}: {what}", file=sys.stderr)


async def _results(ctx: Context, job_id: str, attempt: int) -> jobs_pb2.GetResultsResponse:
    client = ctx.client()
    request = jobs_pb2.GetResultsRequest(job_id=job_id, attempt=attempt)
    return await client.call(client.jobs.GetResults, request)


def results_table(response: jobs_pb2.GetResultsResponse) -> str:
    return table(
        ["PATH", "SIZE", "SHA256"],
        [(o.path, format_bytes(o.size_bytes), o.sha256[:16]) for o in response.objects],
    )


async def job_results(args: argparse.Namespace, ctx: Context) -> int:
    response = await _results(ctx, args.job_id, args.attempt)
    if args.download:
        bar_to = sys.stderr if sys.stderr.isatty() and not ctx.json else None
        await download_all(response, Path(args.download), quiet=ctx.json, progress_to=bar_to)
        save_provenance(Path(args.download), response.provenance)
    if ctx.json:
        print_json(response)
    elif not args.download:
        print(f"attempt {response.attempt}, URLs expire {when(response.urls_expire_at)}")
        print(results_table(response))
    return EXIT_OK


def safe_destination(root: Path, relative: str) -> Path:
    """`root/relative`, refusing paths that would land outside `root`."""
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise CliError(f"refusing to write result {relative!r} outside {root}", EXIT_ERROR)
    return root.joinpath(*path.parts)


async def download_all(
    response: jobs_pb2.GetResultsResponse,
    root: Path,
    *,
    quiet: bool,
    progress_to: TextIO | None = None,
) -> None:
    """Downloads every object to root/<path>, verifying size and sha256 of each; with a bar
    per object on `progress_to` (a terminal), as `data put` shows one."""
    root.mkdir(parents=True, exist_ok=True)
    for obj in response.objects:
        if not obj.url:
            raise CliError(f"no download URL for {obj.path}")
        destination = safe_destination(root, obj.path)
        started = time.monotonic()
        progress = Progress(obj.path, obj.size_bytes, progress_to)
        try:
            await asyncio.to_thread(download_one, obj, destination, progress)
        finally:
            progress.finish()
        if not quiet:
            took = time.monotonic() - started
            size = format_bytes(obj.size_bytes)
            print(f"{destination}  {size}  sha256 ok  ({took:.1f}s)", flush=True)


def download_one(
    obj: types_pb2.ResultObject, destination: Path, progress: Progress | None = None
) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(obj.url, timeout=60) as reply, partial.open("wb") as out:
            while chunk := reply.read(_DOWNLOAD_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
                if progress is not None:
                    progress.advance(len(chunk))
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CliError(f"download of {obj.path} failed: {exc}") from None
    if digest.hexdigest() != obj.sha256.lower() or size != obj.size_bytes:
        partial.unlink(missing_ok=True)
        raise CliError(
            f"{obj.path}: downloaded {size} bytes with sha256 {digest.hexdigest()}, expected "
            f"{obj.size_bytes} bytes with sha256 {obj.sha256}"
        )
    partial.replace(destination)


class _Ticker:
    """A spinner and "STATE for 12s" on stderr (rich's Live, transient), while waiting. It
    is taken down while an event line is printed (`clear`, then `resume`): stdout and stderr
    share the terminal, and a line printed under a live display would be overdrawn."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        self.state = "waiting"
        self.since = time.monotonic()
        self.spinner = Spinner("dots")
        self.live = Live(
            self,
            console=Console(stderr=True),
            transient=True,
            refresh_per_second=4,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def __rich__(self) -> Any:
        elapsed = int(time.monotonic() - self.since)
        self.spinner.update(text=f"{self.state} for {elapsed}s")
        return self.spinner

    def clear(self, state: str) -> None:
        self.live.stop()
        self.state, self.since = state, time.monotonic()

    def resume(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()
