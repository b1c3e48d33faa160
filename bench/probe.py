"""The hardware verification probe's cost on the control plane: Freivalds' check of one GPU's
answer at the default probe size (decoding included), per GPU verified."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from bench.registry import Measurement, RunContext, benchmark
from controlplane.verification import challenge
from controlplane.verification.gpu_table import lookup
from controlplane.verification.settings import VerificationFields


def _defaults() -> tuple[int, int]:
    fields = VerificationFields.model_fields
    n, rounds = fields["probe_n"].default, fields["probe_rounds"].default
    assert isinstance(n, int)
    assert isinstance(rounds, int)
    return n, rounds


def _one_check(seed: bytes, n: int, rounds: int, answer: bytes) -> float:
    """Seconds one check takes; the check computes every row whether the answer is right or
    wrong, so a forged answer (cheap to make at this size) costs what a right one does."""
    start = time.perf_counter()
    try:
        challenge.check(seed, n, rounds, answer, random.Random(1))
    except challenge.BadAnswer:
        pass
    return time.perf_counter() - start


@benchmark(
    "probe_check",
    unit="ms/GPU",
    better="lower",
    description="control-plane CPU time to check one GPU's probe answer (decode + Freivalds "
    "over the seeded matrices) at the default probe size (GPUPLANE_PROBE_N × _ROUNDS)",
)
async def probe_check(ctx: RunContext) -> Measurement:
    n, rounds = _defaults()
    rng = random.Random(0)
    top = n * rounds * challenge.ENTRY_MAX**2
    answer = challenge.encode([rng.randrange(top) for _ in range(n * n)])
    seed = rng.randbytes(challenge.SEED_BYTES)
    times: list[float] = []
    until = time.perf_counter() + ctx.duration
    while len(times) < 3 or time.perf_counter() < until:
        times.append(await asyncio.to_thread(_one_check, seed, n, rounds, answer))
    h100 = lookup("NVIDIA H100 80GB HBM3")
    assert h100 is not None
    work = 2.0 * rounds * n**3
    return Measurement(
        statistics.median(times) * 1000,
        {
            "n": n,
            "rounds": rounds,
            "checks": len(times),
            "answer_bytes": len(answer),
            "gpu_work_gflop": round(work / 1e9, 2),
            "h100_compute_ms": round(work / (h100.fp16_tflops * 1e12) * 1000, 4),
        },
    )
