"""Closed-loop unary gRPC load from several client processes; `python -m bench.load SPEC`.

Each client process runs `concurrency` callers on one channel, each sending the next call as
soon as the last one answers. Requests and responses stay raw bytes (no protobuf work in
the client), so the clients cost as little as possible and the server is what saturates.
All processes warm up until a shared wall-clock start and measure for the same window.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import grpc
from grpc import aio


@dataclass
class LoadSpec:
    target: str
    method: str
    request_hex: str = ""
    metadata: list[tuple[str, str]] = field(default_factory=list)
    concurrency: int = 16
    start_at: float = 0.0  # time.time() when measuring begins; warm-up until then
    duration: float = 3.0


@dataclass
class LoadResult:
    calls: int
    errors: int
    duration: float
    latencies_us: list[int]
    first_error: str = ""


async def drive(spec: LoadSpec) -> LoadResult:
    """Runs one client process's share of the load."""
    request = bytes.fromhex(spec.request_hex)
    metadata = tuple((k, v) for k, v in spec.metadata)
    latencies: list[int] = []
    counts = {"errors": 0}
    first_error: list[str] = []
    end_at = spec.start_at + spec.duration
    async with aio.insecure_channel(spec.target) as channel:
        call = channel.unary_unary(spec.method, None, None)
        await asyncio.wait_for(channel.channel_ready(), timeout=10)

        async def caller() -> None:
            while True:
                started = time.perf_counter()
                now = time.time()
                if now >= end_at:
                    return
                try:
                    await call(request, metadata=metadata, timeout=10)
                except grpc.RpcError as exc:
                    if now >= spec.start_at:
                        counts["errors"] += 1
                        if not first_error:
                            first_error.append(f"{exc.code().name}: {exc.details()}")
                    continue
                if now >= spec.start_at:
                    latencies.append(int((time.perf_counter() - started) * 1e6))

        await asyncio.gather(*(caller() for _ in range(spec.concurrency)))
    return LoadResult(
        calls=len(latencies),
        errors=counts["errors"],
        duration=spec.duration,
        latencies_us=latencies,
        first_error=first_error[0] if first_error else "",
    )


def percentile(sorted_values: list[int], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return float(sorted_values[rank])


@dataclass
class LoadSummary:
    qps: float
    calls: int
    errors: int
    p50_ms: float
    p99_ms: float
    first_error: str

    def details(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "calls": self.calls,
            "errors": self.errors,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }
        if self.first_error:
            out["first_error"] = self.first_error
        return out


async def run_load(spec: LoadSpec, processes: int, warmup: float = 1.0) -> LoadSummary:
    """Starts `processes` client processes against spec.target and merges what they saw."""
    spec.start_at = time.time() + warmup + 0.5  # + interpreter start-up of the clients
    from bench.resources import child_env

    argv = [sys.executable, "-m", "bench.load", json.dumps(asdict(spec))]
    children = [
        await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env()
        )
        for _ in range(processes)
    ]
    outputs = await asyncio.gather(
        *(asyncio.wait_for(c.communicate(), spec.duration + warmup + 30) for c in children)
    )
    results: list[LoadResult] = []
    for child, (out, err) in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"load client failed ({child.returncode}): {err.decode()[-2000:]}")
        results.append(LoadResult(**json.loads(out)))
    latencies = sorted(v for r in results for v in r.latencies_us)
    calls = sum(r.calls for r in results)
    return LoadSummary(
        qps=calls / spec.duration,
        calls=calls,
        errors=sum(r.errors for r in results),
        p50_ms=percentile(latencies, 0.50) / 1000,
        p99_ms=percentile(latencies, 0.99) / 1000,
        first_error=next((r.first_error for r in results if r.first_error), ""),
    )


def main() -> None:
    raw = json.loads(sys.argv[1])
    raw["metadata"] = [tuple(pair) for pair in raw["metadata"]]
    result = asyncio.run(drive(LoadSpec(**raw)))
    sys.stdout.write(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
