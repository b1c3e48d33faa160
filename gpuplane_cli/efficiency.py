"""`gpuplane jobs efficiency JOB`: the GPU time a job paid for, how much of it its GPUs were
busy, and what the idle part cost, per attempt and in total."""

from __future__ import annotations

import argparse

from gpuplane.v1 import jobs_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import EXIT_OK, Context
from gpuplane_cli.output import enum_name, print_json, table
from gpuplane_cli.units import format_bytes, format_credits, format_duration_ms, format_utilization


def register(jobs: a.Subparsers, common: argparse.ArgumentParser) -> None:
    efficiency = a.add_leaf(
        jobs,
        "efficiency",
        efficiency_cmd,
        "paid vs utilised GPU time and idle credits of a job",
        common,
    )
    efficiency.add_argument("job_id")


def _row(e: jobs_pb2.AttemptEfficiency, label: str) -> tuple[str, ...]:
    measured = e.samples > 0
    return (
        label,
        enum_name(types_pb2.AttemptState, e.attempt_state) if e.attempt else "",
        e.gpu_model or "-",
        format_duration_ms(e.paid_gpu_time_ms),
        format_duration_ms(e.utilized_gpu_time_ms) if measured else "-",
        format_utilization(e.avg_gpu_utilization_basis_points) if measured else "-",
        format_bytes(e.peak_gpu_memory_bytes) if measured else "-",
        format_credits(e.charged_micro_credits),
        format_credits(e.idle_micro_credits) if measured else "-",
    )


async def efficiency_cmd(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    request = jobs_pb2.GetJobEfficiencyRequest(job_id=args.job_id)
    response = await client.call(client.jobs.GetJobEfficiency, request)
    if ctx.json:
        print_json(response)
        return EXIT_OK
    header = ["ATTEMPT", "STATE", "GPU", "PAID GPU TIME", "USED", "UTIL", "PEAK MEM"]
    rows = [_row(e, str(e.attempt)) for e in response.attempts]
    rows.append(_row(response.total, "total"))
    print(table([*header, "CHARGED", "IDLE CREDITS"], rows))
    total = response.total
    if total.samples:
        print(
            f"{format_utilization(total.avg_gpu_utilization_basis_points)} of the paid GPU time "
            f"was used; {format_credits(total.idle_micro_credits)} credits paid for idle GPUs"
        )
    else:
        print("no GPU telemetry covered this job yet: utilisation unknown")
    return EXIT_OK
