"""Closed-loop unary gRPC load from several client processes; `python -m bench.load SPEC`.

Each client process runs `concurrency` callers on one channel, each sending the next call as
soon as the last one answers. Requests and responses stay raw bytes (no protobuf work in
the client), so the clients cost as little as possible and the server is what saturates.
All processes warm up until a shared wall-clock start and measure for the same window.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc import aio


@dataclass
class LoadSpec:
    target: str
    method: str
    request_hex: str = ""
    metadata: list[tuple[str, str]] = field(default_factory=list)
    # When given, caller i of process p sends callers_metadata[(p × concurrency + i) % len]
    # instead of `metadata` (one credential per caller).
    callers_metadata: list[list[tuple[str, str]]] = field(default_factory=list)
    process_index: int = 0
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
    latencies: list[int] = []
    counts = {"errors": 0}
    first_error: list[str] = []
    end_at = spec.start_at + spec.duration
    async with aio.insecure_channel(spec.target) as channel:
        call = channel.unary_unary(spec.method, None, None)
        await asyncio.wait_for(channel.channel_ready(), timeout=10)

        async def caller(metadata: tuple[tuple[str, str], ...]) -> None:
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

        await asyncio.gather(*(caller(_metadata_of(spec, i)) for i in range(spec.concurrency)))
    return LoadResult(
        calls=len(latencies),
        errors=counts["errors"],
        duration=spec.duration,
        latencies_us=latencies,
        first_error=first_error[0] if first_error else "",
    )


def _metadata_of(spec: LoadSpec, caller: int) -> tuple[tuple[str, str], ...]:
    if not spec.callers_metadata:
        return tuple((k, v) for k, v in spec.metadata)
    chosen = spec.callers_metadata[
        (spec.process_index * spec.concurrency + caller) % len(spec.callers_metadata)
    ]
    return tuple((k, v) for k, v in chosen)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    """A process's resident memory now, bytes (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


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
    # The server's CPU time per answered call over the window (when its pid was given).
    server_cpu_ms: float | None = None

    def details(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {
            "calls": self.calls,
            "errors": self.errors,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }
        if self.server_cpu_ms is not None:
            out["server_cpu_ms_per_call"] = round(self.server_cpu_ms, 3)
        if self.first_error:
            out["first_error"] = self.first_error
        return out


async def _server_cpu(pid: int, start_at: float, duration: float) -> float:
    """The CPU seconds process `pid` used between wall-clock start_at and start_at+duration."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    before = process_cpu_seconds(pid)
    await asyncio.sleep(max(0.0, start_at + duration - time.time()))
    return process_cpu_seconds(pid) - before


async def run_load(
    spec: LoadSpec, processes: int, warmup: float = 1.0, server_pid: int | None = None
) -> LoadSummary:
    """Starts `processes` client processes against spec.target and merges what they saw;
    with `server_pid`, also what that process's CPU time was per answered call."""
    spec.start_at = time.time() + warmup + 0.5  # + interpreter start-up of the clients
    from bench.resources import child_env

    children = []
    for index in range(processes):
        spec.process_index = index
        argv = [sys.executable, "-m", "bench.load", json.dumps(asdict(spec))]
        children.append(
            await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=child_env(),
            )
        )
    cpu = None
    if server_pid is not None:
        cpu = asyncio.create_task(_server_cpu(server_pid, spec.start_at, spec.duration))
    outputs = await asyncio.gather(
        *(asyncio.wait_for(c.communicate(), spec.duration + warmup + 30) for c in children)
    )
    cpu_seconds = await cpu if cpu is not None else None
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
        server_cpu_ms=cpu_seconds * 1000 / calls if cpu_seconds is not None and calls else None,
    )


def main() -> None:
    raw = json.loads(sys.argv[1])
    raw["metadata"] = [tuple(pair) for pair in raw["metadata"]]
    raw["callers_metadata"] = [[tuple(p) for p in m] for m in raw["callers_metadata"]]
    result = asyncio.run(drive(LoadSpec(**raw)))
    sys.stdout.write(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
