"""Report signing's cost on one core: the signed report path (sign, verify) beside the unsigned."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gpuplane.v1 import messaging_pb2, types_pb2

from bench.registry import Measurement, RunContext, benchmark
from messaging.signing import SigningKey, decode_signature, verify

# The job path's reports: each attempt sends about this many (STARTING, RUNNING, a few USAGE,
# UPLOADING, FINISHED); the figure must stay far above the job path's jobs/s times it.
REPORTS_PER_JOB = 8


def _report(seq: int) -> messaging_pb2.JobReport:
    return messaging_pb2.JobReport(
        job_id="job-0123456789abcdef",
        attempt=1,
        host_id="host-0123456789abcdef",
        seq=seq,
        kind=messaging_pb2.JOB_REPORT_KIND_FINISHED,
        run_time_ms=123_456,
        manifest=[
            types_pb2.ResultObject(
                key=f"jobs/job-0123456789abcdef/1/output/file-{i}",
                path=f"output/file-{i}",
                size_bytes=1024,
                sha256="ab" * 32,
            )
            for i in range(4)
        ],
    )


def _rate(step: Callable[[int], None], duration: float) -> tuple[float, int]:
    """Calls of `step` per second of one core, for about `duration` seconds."""
    count, started = 0, time.perf_counter()
    deadline = started + duration
    while time.perf_counter() < deadline:
        for _ in range(100):
            step(count)
            count += 1
    return count / (time.perf_counter() - started), count


def _unsigned(seq: int) -> None:
    data = _report(seq).SerializeToString()
    messaging_pb2.JobReport.FromString(data)


@benchmark(
    "report_unsigned_per_core",
    unit="reports/s",
    better="higher",
    description="one core: a job report built and serialized (daemon), then parsed (control "
    "plane), no signature",
)
async def report_unsigned_per_core(ctx: RunContext) -> Measurement:
    rate, count = await asyncio.to_thread(_rate, _unsigned, ctx.duration)
    return Measurement(rate, {"reports": count})


@benchmark(
    "report_signed_per_core",
    unit="reports/s",
    better="higher",
    floor="report_unsigned_per_core",
    target=0.02,
    minimum=2000,
    description="one core: the same report serialized and Ed25519-signed (daemon), then its "
    "header decoded, signature verified and report parsed (control plane)",
)
async def report_signed_per_core(ctx: RunContext) -> Measurement:
    key = SigningKey.generate()
    public = key.public_bytes

    def signed(seq: int) -> None:
        data = _report(seq).SerializeToString()
        header = key.header(data)
        signature = decode_signature(header)
        if signature is None or not verify(public, signature, data):
            raise RuntimeError("a report's signature did not verify")
        messaging_pb2.JobReport.FromString(data)

    rate, count = await asyncio.to_thread(_rate, signed, ctx.duration)
    return Measurement(
        rate,
        {
            "reports": count,
            "us_per_report": round(1e6 / rate, 1),
            "jobs_per_s_per_core": round(rate / REPORTS_PER_JOB),
        },
    )
