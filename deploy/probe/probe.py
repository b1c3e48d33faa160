"""gpuplane's hardware verification probe for real GPUs: each seed's matrix product on its GPU.

Reads GPUPLANE_PROBE_N, GPUPLANE_PROBE_ROUNDS and GPUPLANE_PROBE_SEEDS (hex, comma separated;
seed i is for visible CUDA device i, the order of NVIDIA_VISIBLE_DEVICES) and writes, for each,
/output/product-<i>.bin (S = sum_j A_j @ B_j, n x n little-endian uint32, row-major) and
/output/gpu-<i>.json (the device's name and memory as CUDA reports them). A_j and B_j are the
low 3 bits of SHA-256(seed || j u32 LE || 0|1 || block u64 LE) (see probe.c and
controlplane/verification/challenge.py). Entries are 0..7 and n * rounds * 49 < 2^24, so fp32
(or TF32, which holds 0..7 exactly) tensor-core products with fp32 accumulation are exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

import torch


def matrix(seed: bytes, round_: int, which: int, n: int) -> bytes:
    base = hashlib.sha256(seed + struct.pack("<IB", round_, which))
    blocks = []
    for block in range((n * n + 31) // 32):
        h = base.copy()
        h.update(struct.pack("<Q", block))
        blocks.append(h.digest())
    return bytes(b & 7 for b in b"".join(blocks)[: n * n])


def on_device(data: bytes, n: int, device: torch.device) -> torch.Tensor:
    host = torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(n, n)
    return host.to(device).to(torch.float32)


def main() -> int:
    n = int(os.environ["GPUPLANE_PROBE_N"])
    rounds = int(os.environ["GPUPLANE_PROBE_ROUNDS"])
    seeds = [bytes.fromhex(s) for s in os.environ["GPUPLANE_PROBE_SEEDS"].split(",") if s]
    if torch.cuda.device_count() < len(seeds):
        print(f"probe: {len(seeds)} GPUs challenged, {torch.cuda.device_count()} visible",
              file=sys.stderr)  # fmt: skip
        return 3
    torch.backends.cuda.matmul.allow_tf32 = True  # exact for entries 0..7
    for index, seed in enumerate(seeds):
        device = torch.device("cuda", index)
        total = torch.zeros((n, n), dtype=torch.float32, device=device)
        for round_ in range(rounds):
            a = on_device(matrix(seed, round_, 0, n), n, device)
            b = on_device(matrix(seed, round_, 1, n), n, device)
            total += a @ b
        values = total.round().to(torch.int64).cpu().numpy().astype("<u4")
        values.tofile(f"/output/product-{index}.bin")
        props = torch.cuda.get_device_properties(device)
        with open(f"/output/gpu-{index}.json", "w") as facts:
            json.dump({"name": props.name, "memory_total_bytes": props.total_memory}, facts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
