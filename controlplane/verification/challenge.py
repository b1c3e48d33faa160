"""The probe's challenge: matrices drawn from a seed, their product, and Freivalds' check.

For a seed, round j and n, A_j and B_j are n×n matrices of integers 0..7: byte t of the
stream SHA-256(seed ‖ j as u32 LE ‖ 0 for A, 1 for B ‖ block as u64 LE), block = t // 32,
masked to its low 3 bits, row-major. The answer is S = Σ_j A_j·B_j, exact: with
n·rounds·49 < 2^24 every partial sum fits fp32's integers, so a GPU computes it with fp16
inputs and fp32 accumulation and no rounding. Checking S costs O(rounds·n²) (Freivalds:
S·r == Σ_j A_j·(B_j·r) for a random vector r, exact in integers; a wrong S passes with
probability at most 2^-32), computing it O(rounds·n³)."""

from __future__ import annotations

import hashlib
import math
import random
import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from operator import mul

from controlplane.verification.gpu_table import GpuModel

SEED_BYTES = 16
# Largest entry of A and B, and the exactness bound on n·rounds (fp32 holds integers < 2^24).
ENTRY_MAX = 7
MAX_TERMS = (1 << 24) // (ENTRY_MAX * ENTRY_MAX)
_MASK = bytes(b & ENTRY_MAX for b in range(256))


class BadAnswer(Exception):
    """The answer is malformed or wrong; the message says how."""


@dataclass(frozen=True, slots=True)
class Challenge:
    n: int
    rounds: int
    # One seed per claimed GPU, by index.
    seeds: tuple[bytes, ...]
    deadline_ms: int


def validate_size(n: int, rounds: int) -> None:
    if n < 1 or rounds < 1 or n * rounds > MAX_TERMS:
        raise ValueError(f"n·rounds must be 1..{MAX_TERMS} (exact in fp32); got {n}·{rounds}")


def deadline_ms(model: GpuModel, n: int, rounds: int, allowance_ms: int, slack: float) -> int:
    """The time a genuine `model` needs for one GPU's product, times `slack`, plus a fixed
    allowance for starting the probe's container and sending the answer back."""
    seconds = 2.0 * rounds * n**3 / (model.fp16_tflops * 1e12)
    return allowance_ms + math.ceil(seconds * slack * 1000)


def new_challenge(gpus: int, n: int, rounds: int, deadline: int) -> Challenge:
    validate_size(n, rounds)
    seeds = tuple(random.SystemRandom().randbytes(SEED_BYTES) for _ in range(gpus))
    return Challenge(n, rounds, seeds, deadline)


def matrix(seed: bytes, round_: int, which: int, n: int) -> bytes:
    """A_round (which=0) or B_round (which=1): n·n entries 0..7, row-major."""
    base = hashlib.sha256(seed + struct.pack("<IB", round_, which))
    blocks = []
    for block in range((n * n + 31) // 32):
        h = base.copy()
        h.update(struct.pack("<Q", block))
        blocks.append(h.digest())
    return b"".join(blocks)[: n * n].translate(_MASK)


def product(seed: bytes, n: int, rounds: int) -> list[int]:
    """Σ_j A_j·B_j computed directly (O(rounds·n³) in Python: for tests and honest
    simulations at small n)."""
    total = [0] * (n * n)
    for round_ in range(rounds):
        a, b = matrix(seed, round_, 0, n), matrix(seed, round_, 1, n)
        columns = [b[k::n] for k in range(n)]
        for i in range(n):
            row = a[i * n : (i + 1) * n]
            for k in range(n):
                total[i * n + k] += sum(map(mul, row, columns[k]))
    return total


def encode(values: list[int]) -> bytes:
    """The wire form of a product: little-endian uint32, row-major, zlib-compressed."""
    packed = array("I", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return zlib.compress(packed.tobytes(), 1)


def decode(data: bytes, n: int) -> array[int]:
    """The product's n·n entries; BadAnswer when the data is not exactly that."""
    size = n * n * 4
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, size + 1)
    except zlib.error as error:
        raise BadAnswer(f"the product is not zlib data ({error})") from None
    if len(raw) != size or inflater.unconsumed_tail or not inflater.eof:
        raise BadAnswer(f"the product is not {n}×{n} uint32 values")
    values = array("I")
    values.frombytes(raw)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def check(seed: bytes, n: int, rounds: int, answer: bytes, rng: random.Random) -> None:
    """Freivalds' check of one GPU's answer; raises BadAnswer naming the first wrong row."""
    values = decode(answer, n)
    r = [rng.getrandbits(32) for _ in range(n)]
    expected = [0] * n
    for round_ in range(rounds):
        a, b = matrix(seed, round_, 0, n), matrix(seed, round_, 1, n)
        br = [sum(map(mul, b[j * n : (j + 1) * n], r)) for j in range(n)]
        for i in range(n):
            expected[i] += sum(map(mul, a[i * n : (i + 1) * n], br))
    # Every row is computed before any is compared: the check costs the same, right or wrong.
    got = [sum(map(mul, values[i * n : (i + 1) * n], r)) for i in range(n)]
    wrong = [i for i in range(n) if got[i] != expected[i]]
    if wrong:
        raise BadAnswer(f"row {wrong[0]} of the product is wrong ({len(wrong)} of {n} rows)")
