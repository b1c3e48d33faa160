"""The probe's challenge and check (Freivalds, exact in integers), the C probe's agreement with
it, and the model table's cross-check of NVML facts."""

from __future__ import annotations

import random
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest

from controlplane.verification import challenge
from controlplane.verification.gpu_table import GIB, lookup, mismatch
from devstack.images import PROBE_SOURCE

SEED = bytes(range(16))


def test_a_right_product_passes_and_any_single_wrong_entry_fails() -> None:
    n, rounds = 12, 3
    right = challenge.product(SEED, n, rounds)
    challenge.check(SEED, n, rounds, challenge.encode(right), random.Random(1))
    rng = random.Random(2)
    for _ in range(20):
        wrong = list(right)
        wrong[rng.randrange(n * n)] += rng.choice([1, -1, 1 << 20])
        with pytest.raises(challenge.BadAnswer, match="of the product is wrong"):
            challenge.check(SEED, n, rounds, challenge.encode(wrong), random.Random(3))
    # Another seed's product is wrong too (no replaying an earlier answer).
    other = challenge.encode(challenge.product(b"\x01" * 16, n, rounds))
    with pytest.raises(challenge.BadAnswer, match=f"{n} of {n} rows"):
        challenge.check(SEED, n, rounds, other, random.Random(4))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not zlib", "not zlib data"),
        (zlib.compress(b"\0" * (4 * 10 * 10)), "not 12×12"),
        (zlib.compress(b"\0" * (4 * 12 * 12 + 4)), "not 12×12"),
        (zlib.compress(b"\0" * (1 << 24)), "not 12×12"),  # a bomb is not inflated past n·n·4
    ],
)
def test_malformed_answers_are_refused_by_name(data: bytes, message: str) -> None:
    with pytest.raises(challenge.BadAnswer, match=message):
        challenge.check(SEED, 12, 2, data, random.Random(1))


def test_sizes_beyond_fp32_exactness_are_refused() -> None:
    challenge.validate_size(512, challenge.MAX_TERMS // 512)
    with pytest.raises(ValueError, match="exact in fp32"):
        challenge.validate_size(4096, 1000)


def test_the_c_probe_computes_what_the_check_expects(tmp_path: Path) -> None:
    compiler = shutil.which("gcc") or shutil.which("cc")
    assert compiler is not None, "the probe's test image needs a C compiler"
    binary = tmp_path / "probe"
    subprocess.run([compiler, "-O2", "-o", str(binary), str(PROBE_SOURCE)], check=True)
    seeds = [SEED, b"\xff" * 16]
    env = {
        "GPUPLANE_PROBE_N": "20",
        "GPUPLANE_PROBE_ROUNDS": "3",
        "GPUPLANE_PROBE_SEEDS": ",".join(s.hex() for s in seeds),
        "GPUPLANE_PROBE_OUTPUT": str(tmp_path),
    }
    subprocess.run([str(binary)], env=env, check=True, timeout=30)
    for index, seed in enumerate(seeds):
        raw = (tmp_path / f"product-{index}.bin").read_bytes()
        challenge.check(seed, 20, 3, zlib.compress(raw), random.Random(index))


def test_model_table_names_the_fact_that_does_not_fit() -> None:
    assert lookup("NVIDIA A100-SXM4-80GB").name == "A100"  # type: ignore[union-attr]
    assert lookup("NVIDIA A10").name == "A10"  # type: ignore[union-attr]
    assert lookup("NVIDIA L40S").name == "L40S"  # type: ignore[union-attr]
    assert lookup("Tesla K80") is None
    h100 = "NVIDIA H100 80GB HBM3"
    assert mismatch(h100, 81559 * 1024**2, "9.0", 700_000) == ""
    assert "a H100 has 80/94 GiB" in mismatch(h100, 24 * GIB, "9.0", 700_000)
    assert "compute capability 8.0" in mismatch(h100, 80 * GIB, "8.0", 700_000)
    assert "power limit of 900 W" in mismatch(h100, 80 * GIB, "9.0", 900_000)
    assert "power limit of 0 W" in mismatch(h100, 80 * GIB, "9.0", 0)
    assert "not a model the verification table knows" in mismatch("Tesla K80", GIB, "3.7", 1)
    assert mismatch("Tesla T4", 15360 * 1024**2, "7.5", 70_000) == ""
