"""`gpuplane apply` against a real control plane: the stored spec is the one `jobs submit`
with the same flags stores, --dry-run creates nothing, and the server's refusal of a field
comes back at that field's line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.cli.conftest import Cli, Served
from tests.cli.test_commands import new_consumer

JOB = """\
image: busybox
command: [sh, -c, "echo hi"]
gpus: 2
gpu_models: [A100-80GB]
memory: 64m
max_duration: 30m
max_price: 2.5
budget: 1.25
env: {GREETING: hello}
labels: {team: ml, run: apply}
inputs: [./weights.bin:in/w.bin]
max_retries: 1
retry_on_exit_codes: [75]
min_reliability: 90
placement: spread
allow_unverified: true
"""

FLAGS = (
    "--image", "busybox", "--gpus", "2", "--gpu-model", "A100-80GB", "--memory", "64m",
    "--max-duration", "30m", "--max-price", "2.5", "--budget", "1.25",
    "--env", "GREETING=hello", "--label", "team=ml", "--label", "run=apply",
    "--max-retries", "1", "--retry-on-exit-code", "75", "--min-reliability", "90",
    "--placement", "spread", "--allow-unverified",
)  # fmt: skip


def stored_spec(cli: Cli, secret: str, job_id: str) -> dict[str, Any]:
    got = cli("--json", "jobs", "get", job_id, key=secret)
    assert got.code == 0, got.err
    job = got.json()
    assert isinstance(job, dict)
    spec = job["spec"]
    assert isinstance(spec, dict)
    return spec


def job_ids(cli: Cli, secret: str) -> list[str]:
    listing = cli("--json", "jobs", "list", key=secret)
    assert listing.code == 0, listing.err
    jobs = listing.json()
    assert isinstance(jobs, list)
    return [job["job_id"] for job in jobs]


def test_apply_stores_the_spec_jobs_submit_stores(cli: Cli, served: Served, tmp_path: Path) -> None:
    tenant, secret = new_consumer(cli, served)
    assert cli("ledger", "deposit", "100", "--tenant", tenant, key=served.admin_key).code == 0
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"weights")
    (folder / "job.yaml").write_text(JOB)
    # Run from elsewhere: the local input is found beside the job file.
    applied = cli("--json", "apply", str(folder / "job.yaml"), key=secret)
    assert applied.code == 0, applied.err
    applied_id = applied.json()["job_id"]  # type: ignore[index]
    weights = str(folder / "weights.bin")
    submitted = cli(
        "--json", "jobs", "submit", *FLAGS, "--input", f"{weights}:in/w.bin",
        "--", "sh", "-c", "echo hi", key=secret,
    )  # fmt: skip
    assert submitted.code == 0, submitted.err
    submitted_id = submitted.json()["job_id"]  # type: ignore[index]
    from_file = stored_spec(cli, secret, applied_id)
    assert from_file == stored_spec(cli, secret, submitted_id)
    assert from_file["inputs"][0]["key"].startswith("uploads/")
    assert from_file["budget_micro_credits"] == "1250000"


def test_dry_run_quotes_and_creates_nothing(cli: Cli, served: Served, tmp_path: Path) -> None:
    tenant, secret = new_consumer(cli, served)
    assert cli("ledger", "deposit", "10", "--tenant", tenant, key=served.admin_key).code == 0
    path = tmp_path / "job.yaml"
    path.write_text("image: busybox\nmax_price: 2.5\nmax_duration: 30m\ncommand: echo hi\n")
    quote = cli("apply", str(path), "--dry-run", key=secret)
    assert quote.code == 0, quote.err
    assert "Would hold:" in quote.out
    assert "Matching hosts:" in quote.out
    assert job_ids(cli, secret) == []
    as_json = cli("--json", "apply", str(path), "--dry-run", key=secret)
    assert as_json.json()["hold_micro_credits"] == "1250000"  # type: ignore[index]
    assert job_ids(cli, secret) == []


def test_the_servers_refusal_names_the_file_line_and_field(
    cli: Cli, served: Served, tmp_path: Path
) -> None:
    tenant, secret = new_consumer(cli, served)
    assert cli("ledger", "deposit", "10", "--tenant", tenant, key=served.admin_key).code == 0
    path = tmp_path / "job.yaml"
    path.write_text("image: busybox\nmax_price: 1\nenv:\n  OK: 1\n  CUDA_VISIBLE_DEVICES: 0\n")
    refused = cli("apply", str(path), key=secret)
    assert refused.code == 2
    assert refused.err.startswith(f"error: {path}:5: env: ")
    assert "Traceback" not in refused.err
    image = tmp_path / "image.yaml"
    image.write_text("# bad image\nimage: Not An Image\nmax_price: 1\n")
    bad = cli("apply", str(image), "--dry-run", key=secret)
    assert bad.code == 2
    assert bad.err.startswith(f"error: {image}:2: image: 'Not An Image' is not a valid image")
    assert job_ids(cli, secret) == []
