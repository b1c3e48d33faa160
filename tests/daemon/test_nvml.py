"""nvml_gpus through the real pynvml against a fake libnvidia-ml.so.1 built from nvml.h."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
_PROBE = """
import json
from google.protobuf.json_format import MessageToDict
from daemon.gpus import NoGpuError, nvml_gpus
try:
    inventory = nvml_gpus()
except NoGpuError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({
        "gpus": [MessageToDict(g, preserving_proto_field_name=True) for g in inventory.gpus],
        "driver": inventory.driver_version,
        "cuda": inventory.cuda_driver_version,
        "simulated": inventory.simulated,
    }))
"""


def probe(library_dir: Path | None, gpus: int = 2) -> dict[str, Any]:
    """Runs nvml_gpus() in a child: the loader reads LD_LIBRARY_PATH only at process start."""
    env = {**os.environ, "FAKE_NVML_GPUS": str(gpus)}
    env["LD_LIBRARY_PATH"] = str(library_dir) if library_dir else "/nonexistent"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=HERE.parent.parent,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_nvml_fingerprint(fake_nvml: Path) -> None:
    result = probe(fake_nvml)
    assert result["driver"] == "550.54.15"
    assert result["cuda"] == "12.4"
    assert result["simulated"] is False
    h100, rtx = result["gpus"]
    assert h100 == {
        "uuid": "GPU-fa4e0000-0000-0000-0000-000000000000",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": str(80 << 30),
        "compute_capability": "9.0",
        "pci_bus_id": "00000000:18:00.0",
        "mig_mode": "MIG_MODE_DISABLED",
        "power_limit_milliwatts": 400000,
        "healthy": True,
    }
    assert rtx["index"] == 1
    assert rtx["mig_mode"] == "MIG_MODE_NOT_SUPPORTED"
    assert "power_limit_milliwatts" not in rtx
    assert rtx["compute_capability"] == "8.9"


def test_no_device_is_no_gpu_error(fake_nvml: Path) -> None:
    assert probe(fake_nvml, gpus=0) == {"error": "NVML found no GPU on this machine"}


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this machine has an NVIDIA driver")
def test_missing_library_is_no_gpu_error() -> None:
    result = probe(None)
    assert str(result["error"]).startswith("NVML is not usable on this machine: ")
