"""The committed stubs match the protos, and the drift check notices when they do not."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "gen-stubs"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_stubs_match_protos() -> None:
    done = run_check(ROOT)
    assert done.returncode == 0, done.stderr


def test_drift_check_fails_when_proto_changes(tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", copy / "proto")
    shutil.copytree(ROOT / "scripts", copy / "scripts")
    jobs = copy / "proto" / "gpuplane" / "v1" / "jobs.proto"
    jobs.write_text(
        jobs.read_text().replace(
            "message GetJobRequest {\n  string job_id = 1;\n}",
            "message GetJobRequest {\n  string job_id = 1;\n  bool verbose = 2;\n}",
        )
    )
    done = run_check(copy)
    assert done.returncode == 1
    assert "jobs_pb2.py" in done.stderr
    assert "out of date" in done.stderr
