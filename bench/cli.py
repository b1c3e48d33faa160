"""`scripts/bench`: run the named benchmarks and print figure, floor and ratio for each."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import (  # noqa: F401 - registers them
    figures,
    fleet,
    fleetscale,
    floors,
    gateway,
    jobpath,
    jobsettle,
    ledger,
    probe,
    scheduler,
    signing,
    submit,
    telemetry,
    tunnels,
)
from bench.registry import REGISTRY, Benchmark, Result, RunContext, plan, ratio_of
from bench.resources import Resources

# Beyond its own duration, a benchmark may spend this long starting servers and warming up.
SETUP_ALLOWANCE = 120.0


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def format_table(results: list[Result]) -> str:
    from gpuplane_cli.output import table

    rows = []
    for r in results:
        if r.error:
            rows.append((r.name, "FAILED", "", "", "", r.error.splitlines()[0][:120]))
            continue
        floor = f"{r.floor_name} {_number(r.floor)}" if r.floor_name else "-"
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else "-"
        sign = ">=" if r.better == "higher" else "<="
        aims = [f"{sign} {r.target:g}"] if r.target is not None else []
        if r.minimum is not None:
            aims.append(f">= {_number(r.minimum)} {r.unit}")
        if r.maximum is not None:
            aims.append(f"<= {_number(r.maximum)} {r.unit}")
        target = "-"
        if aims:
            target = f"{' and '.join(aims)} {'ok' if r.meets_target else 'MISSED'}"
        notes = ", ".join(f"{k} {v}" for k, v in r.details.items())
        rows.append((r.name, f"{_number(r.figure)} {r.unit}", floor, ratio, target, notes))
    return table(["BENCHMARK", "FIGURE", "FLOOR (same run)", "RATIO", "TARGET", "DETAILS"], rows)


async def run_one(bench: Benchmark, ctx: RunContext) -> Result:
    floor = ctx.results.get(bench.floor) if bench.floor else None
    started = time.monotonic()
    result = Result(
        name=bench.name,
        figure=None,
        unit=bench.unit,
        floor=floor.figure if floor else None,
        floor_name=bench.floor,
        ratio=None,
        target=bench.target,
        minimum=bench.minimum,
        maximum=bench.maximum,
        better=bench.better,
        seconds=0.0,
    )
    try:
        allowance = SETUP_ALLOWANCE if bench.allowance is None else bench.allowance
        measured = await asyncio.wait_for(bench.run(ctx), ctx.duration * 3 + allowance)
    except Exception as exc:  # noqa: BLE001 - one failed benchmark must not stop the others
        result.error = f"{type(exc).__name__}: {exc}"
    else:
        result.figure = measured.figure
        result.details = measured.details
        result.ratio = ratio_of(measured, floor)
    result.seconds = time.monotonic() - started
    ctx.results[bench.name] = result
    return result


async def run_all(
    benches: list[Benchmark], args: argparse.Namespace, workdir: Path
) -> list[Result]:
    async with Resources(workdir) as resources:
        ctx = RunContext(
            duration=args.duration,
            resources=resources,
            workdir=workdir,
            client_processes=args.clients,
            concurrency=args.concurrency,
        )
        results = []
        for bench in benches:
            if not args.json:
                print(f"running {bench.name} …", file=sys.stderr, flush=True)
            results.append(await run_one(bench, ctx))
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="repeatable")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--json", action="store_true", help="print a JSON list of results")
    parser.add_argument(
        "--duration", type=float, default=3.0, help="seconds each benchmark measures (default 3)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=max(1, min(4, (os.cpu_count() or 2) - 2)),
        help="load client processes",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="callers per client process")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args(argv)
    if args.list:
        for bench in sorted(REGISTRY.values(), key=lambda b: b.floor is not None):
            kind = f"figure vs {bench.floor}" if bench.floor else "floor"
            print(f"{bench.name:<26} {bench.unit:<8} {kind:<28} {bench.description}")
        return 0
    try:
        benches = plan(args.only or list(REGISTRY))
    except KeyError as exc:
        parser.error(str(exc.args[0]))
    workdir = Path(tempfile.mkdtemp(prefix="gpuplane-bench-"))
    try:
        results = asyncio.run(run_all(benches, args, workdir))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps([r.as_json() for r in results], indent=2))
    else:
        print(format_table(results))
    return 1 if any(r.error for r in results) else 0
