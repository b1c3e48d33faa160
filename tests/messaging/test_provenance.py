"""The provenance document's offline check, on documents built here: each check fails on its
own, naming what failed, and an intact set passes."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from messaging.provenance import (
    CLOCK_SLACK_MS,
    FILE_NAME,
    VerifyFailed,
    countersign,
    host_part,
    verify_results,
)
from messaging.signing import SigningKey, b64, canonical

DATA = b"result bytes"
START = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def result_set(root: Path, *, billed: int = 1000, clock_ms: int = 1000) -> SigningKey:
    """root/out.bin and root/provenance.json, countersigned by the key returned."""
    host_key, cp_key = SigningKey.generate(), SigningKey.generate()
    root.mkdir(parents=True, exist_ok=True)
    (root / "out.bin").write_bytes(DATA)
    part = host_part(
        job_id="job-1",
        attempt=1,
        host_id="host-1",
        image={"reference": "busybox", "digest": "sha256:" + "a" * 64},
        gpus=[{"uuid": "GPU-1", "name": "NVIDIA A100"}],
        driver_version="550",
        started_at=START,
        ended_at=START + timedelta(milliseconds=clock_ms),
        exit_code=0,
        run_time_ms=billed,
        outputs=[
            {
                "key": "jobs/job-1/1/out.bin",
                "path": "out.bin",
                "size_bytes": len(DATA),
                "sha256": hashlib.sha256(DATA).hexdigest(),
            }
        ],
    )
    data = canonical(part)
    control_plane: dict[str, Any] = {
        "host_public_key": b64(host_key.public_bytes),
        "control_plane_clock": {
            "running_at": START.isoformat(),
            "ended_at": (START + timedelta(milliseconds=clock_ms)).isoformat(),
        },
        "clock_slack_ms": CLOCK_SLACK_MS,
        "billed_run_time_ms": billed,
    }
    document = countersign(data, host_key.sign(data), control_plane, cp_key)
    (root / FILE_NAME).write_text(document)
    return cp_key


def test_an_intact_set_verifies_against_its_pinned_key(tmp_path: Path) -> None:
    key = result_set(tmp_path)
    verified = verify_results(tmp_path, key.public_bytes)
    assert (verified.job_id, verified.attempt, verified.outputs) == ("job-1", 1, 1)
    with pytest.raises(VerifyFailed, match="control_plane_public_key"):
        verify_results(tmp_path, SigningKey.generate().public_bytes)


def test_billed_time_beyond_the_clocks_fails_though_signed(tmp_path: Path) -> None:
    result_set(tmp_path, billed=60_000, clock_ms=1000)
    with pytest.raises(VerifyFailed, match="billed_run_time_ms: 60000 ms exceeds the control"):
        verify_results(tmp_path)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda root: (root / "out.bin").unlink(), "output out.bin: missing"),
        (lambda root: (root / "out.bin").write_bytes(DATA + b"!"), "output out.bin: 13 bytes"),
        (lambda root: (root / FILE_NAME).unlink(), "provenance.json: not found"),
        (lambda root: (root / FILE_NAME).write_text("{"), "provenance.json: unreadable"),
    ],
)
def test_each_damage_is_named(tmp_path: Path, damage: Any, named: str) -> None:
    result_set(tmp_path)
    damage(tmp_path)
    with pytest.raises(VerifyFailed, match=named):
        verify_results(tmp_path)


def test_an_output_path_outside_the_set_is_refused(tmp_path: Path) -> None:
    result_set(tmp_path)
    document = json.loads((tmp_path / FILE_NAME).read_text())
    document["host"]["outputs"][0]["path"] = "../escape"
    (tmp_path / FILE_NAME).write_text(json.dumps(document))
    with pytest.raises(VerifyFailed, match="control_plane_signature"):
        verify_results(tmp_path)  # the signature catches it before any path is opened
