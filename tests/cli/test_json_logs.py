"""JSON logs: `gpuplane controlplane serve --log-format json` and `gpuplane daemon run` with
GPUPLANE_DAEMON_LOG_FORMAT=json, both real processes, run a real job; every line either
writes is one JSON object, and the job's lines carry its job id (and attempt and host)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from devstack import DockerEngine
from messaging.jsonlog import JsonFormatter, log_fields
from tests.cli.conftest import Cli, Served
from tests.cli.test_commands import new_consumer

pytestmark = [pytest.mark.timeout(180), pytest.mark.docker]
SERVE_ARGS = ["--log-level", "INFO", "--log-format", "json"]
GPUPLANE = Path(sys.executable).parent / "gpuplane"


def json_lines(path: Path) -> list[dict[str, object]]:
    """Each line of the log as an object; fails on a line that is not one."""
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{path.name}:{number} is not JSON: {line!r}")
        assert isinstance(value, dict), line
        assert {"time", "level", "logger", "message"} <= value.keys(), line
        lines.append(value)
    return lines


def start_daemon(
    cli: Cli, served: Served, engine: DockerEngine, tmp_path: Path
) -> subprocess.Popen[bytes]:
    made = cli("--json", "admin", "tenants", "create", f"prov-{uuid.uuid4().hex[:8]}",
               key=served.admin_key)  # fmt: skip
    provider = made.json()["tenant_id"]  # type: ignore[index]
    token = cli("admin", "tokens", "create", "--provider", provider, key=served.admin_key)
    assert token.code == 0, token.err
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
    env["GPUPLANE_DAEMON_LOG_FORMAT"] = "json"
    argv = [str(GPUPLANE), "daemon", "run", "--plaintext", "--control-plane", served.addr]
    argv += ["--token", token.out.splitlines()[-1], "--data-dir", str(tmp_path / "daemon")]
    argv += ["--docker-host", engine.base_url, "--simulate-gpus", "1xA100-80GB"]
    argv += ["--price-per-gpu-hour", "2"]
    with (tmp_path / "daemon.log").open("wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_both_processes_log_json_with_the_job_id(
    cli: Cli, served: Served, docker_engine: DockerEngine, test_image: str, tmp_path: Path
) -> None:
    tenant, key = new_consumer(cli, served)
    assert cli("ledger", "deposit", "10", "--tenant", tenant, key=served.admin_key).code == 0
    daemon = start_daemon(cli, served, docker_engine, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not cli("--json", "hosts", "list", key=served.admin_key).json():
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not register"
            time.sleep(0.2)
        submit = ["jobs", "submit", "--image", test_image, "--allow-simulated"]
        submit += ["--allow-unverified", "--max-duration", "1m", "--", "echo", "hi"]
        run = cli("--json", *submit, key=key)
        assert run.code == 0, run.err
        job_id = run.json()["job_id"]  # type: ignore[index]
        waited = cli("jobs", "watch", job_id, key=key)
        assert waited.code == 0, waited.err + (tmp_path / "daemon.log").read_text()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()

    daemon_lines = [
        line for line in json_lines(tmp_path / "daemon.log") if line.get("job_id") == job_id
    ]
    assert any(
        line["message"] == f"attempt {job_id}/1 ended: JOB_REPORT_KIND_FINISHED"
        for line in daemon_lines
    ), daemon_lines
    assert all(
        line["attempt"] == 1 and str(line["host_id"]).startswith("host") for line in daemon_lines
    )

    host_id = daemon_lines[0]["host_id"]
    served_log = json_lines(served.data_dir / "serve.log")
    host_lines = [line["message"] for line in served_log if line.get("host_id") == host_id]
    assert f"host {host_id}: registered → online (its daemon connected (hello))" in host_lines
    plane_lines = [line for line in served_log if line.get("job_id") == job_id]
    applied = [
        line["message"] for line in plane_lines if line["logger"] == "controlplane.jobs.consumer"
    ]
    assert f"report JOB_REPORT_KIND_FINISHED for {job_id}/1 applied" in applied, plane_lines


def record(message: str, extra: dict[str, object] | None = None) -> logging.LogRecord:
    exc_info = sys.exc_info() if sys.exc_info()[0] is not None else None
    logger = logging.getLogger("tests.jsonlog")
    return logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, message, (), exc_info, extra=extra
    )


def test_ids_come_from_extra_or_the_surrounding_fields() -> None:
    plain = record("x", extra={"job_id": "job-a"})
    with log_fields(job_id="job-b", attempt=2, host_id=""):
        line = json.loads(JsonFormatter().format(plain))
        assert line["job_id"] == "job-a", "a call's own extra wins"
        assert line["attempt"] == 2
        assert "host_id" not in line, "empty ids are left out"
    assert "attempt" not in json.loads(JsonFormatter().format(plain)), "fields end with the block"
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        failed = record("failed")
    text = JsonFormatter().format(failed)
    assert "\n" not in text, "one line, even with a traceback"
    assert "ValueError: boom" in json.loads(text)["exception"]
