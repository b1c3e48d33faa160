"""What each common NVIDIA model is: memory, compute capability, power limit, throughput."""

from __future__ import annotations

import re
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuModel:
    """One model's published figures. Throughputs are dense (no sparsity) and the lowest of
    the model's variants (PCIe rather than SXM), so that a deadline derived from them is
    lenient to every genuine board."""

    name: str
    pattern: re.Pattern[str]
    # Nominal memory sizes of the model's variants, in GiB (NVML reports a little less).
    memory_gib: tuple[int, ...]
    compute_capability: str
    # The highest power limit any variant allows, in watts.
    max_power_watts: int
    fp16_tflops: float
    fp32_tflops: float


def _model(name: str, pattern: str, memory: tuple[int, ...], cc: str, watts: int,
           fp16: float, fp32: float) -> GpuModel:  # fmt: skip
    return GpuModel(name, re.compile(pattern, re.IGNORECASE), memory, cc, watts, fp16, fp32)


# Most specific first: "A100" before "A10", "L40S" before "L40", "H200" before "H100".
MODELS: tuple[GpuModel, ...] = (
    _model("H200", r"\bH200\b", (141,), "9.0", 700, 756.0, 51.0),
    _model("H100", r"\bH100\b", (80, 94), "9.0", 700, 756.0, 51.0),
    _model("A100", r"\bA100\b", (40, 80), "8.0", 400, 312.0, 19.5),
    _model("L40S", r"\bL40S\b", (48,), "8.9", 350, 362.0, 91.6),
    _model("L40", r"\bL40\b", (48,), "8.9", 300, 181.0, 90.5),
    _model("L4", r"\bL4\b", (24,), "8.9", 75, 121.0, 30.3),
    _model("A10G", r"\bA10G\b", (24,), "8.6", 300, 70.0, 31.2),
    _model("A10", r"\bA10\b", (24,), "8.6", 150, 125.0, 31.2),
    _model("RTX 4090", r"\bRTX 4090\b", (24,), "8.9", 600, 165.0, 82.6),
    _model("RTX 3090", r"\bRTX 3090\b", (24,), "8.6", 450, 71.0, 35.6),
    _model("V100", r"\bV100\b", (16, 32), "7.0", 300, 112.0, 14.0),
    _model("T4", r"\bT4\b", (16,), "7.5", 70, 65.0, 8.1),
)
# How far NVML's memory total may fall from a nominal size (it reports usable memory).
MEMORY_TOLERANCE = 0.10


def lookup(name: str) -> GpuModel | None:
    """The table's entry for an NVML device name, e.g. "NVIDIA H100 80GB HBM3"; None when
    the model is not in the table."""
    for model in MODELS:
        if model.pattern.search(name):
            return model
    return None


def mismatch(
    name: str, memory_total_bytes: int, compute_capability: str, power_limit_milliwatts: int
) -> str:
    """Why these NVML facts cannot belong to a GPU called `name` ("" when they can)."""
    model = lookup(name)
    if model is None:
        return f"{name!r} is not a model the verification table knows"
    gib = memory_total_bytes / GIB
    if not any(abs(gib - size) <= size * MEMORY_TOLERANCE for size in model.memory_gib):
        sizes = "/".join(str(s) for s in model.memory_gib)
        return f"{name!r} reports {gib:.1f} GiB of memory; a {model.name} has {sizes} GiB"
    if compute_capability != model.compute_capability:
        return (
            f"{name!r} reports compute capability {compute_capability or 'none'}; a "
            f"{model.name} has {model.compute_capability}"
        )
    watts = power_limit_milliwatts / 1000
    if not 0 < watts <= model.max_power_watts:
        return (
            f"{name!r} reports a power limit of {watts:.0f} W; a {model.name} allows at most "
            f"{model.max_power_watts} W"
        )
    return ""
