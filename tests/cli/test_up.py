"""`gpuplane up` as a user runs it: a child process with a data dir, stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack import TEST_IMAGE, free_port, free_ports
from gpuplane_cli.client import parse_env_file
from gpuplane_cli.main import main
from gpuplane_cli.up import port_or_free

READY_LINE = "gpuplane is up"
SERVER_NAMES = ("nats-server", "weed", "dockerd", "containerd")


@dataclass
class UpProcess:
    process: subprocess.Popen[str]
    lines: queue.Queue[str]
    output: list[str]
    data_dir: Path
    port: int
    started_at: float

    def wait_for(self, text: str, timeout: float) -> float:
        """Seconds from the exec until a line containing `text` appears on stdout."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None and self.lines.empty():
                pytest.fail(f"no {text!r} from gpuplane up:\n" + "".join(self.output))
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if text in line:
                return time.monotonic() - self.started_at

    def interrupt(self, timeout: float = 30.0) -> int:
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)


def children_of_data_dir(data_dir: Path) -> list[tuple[int, str]]:
    """Processes whose command line mentions `data_dir` (the servers `up` started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = " ".join(a.decode(errors="replace") for a in argv)
        if str(data_dir) in text and any(name in text for name in SERVER_NAMES):
            found.append((int(entry.name), text))
    return found


def start_up(data_dir: Path, *extra: str) -> UpProcess:
    port, metrics_port, dashboard_port = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
    argv = [sys.executable, "-m", "gpuplane_cli.main", "up", "--data-dir", str(data_dir)]
    argv += ["--port", str(port), "--metrics-port", str(metrics_port)]
    argv += ["--dashboard-port", str(dashboard_port), *extra]
    started_at = time.monotonic()
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return UpProcess(process, lines, output, data_dir, port, started_at)


@contextlib.contextmanager
def running_up(data_dir: Path, *extra: str) -> Iterator[UpProcess]:
    """`gpuplane up` for the block; after it (a failed test included) Ctrl-C, then SIGKILL
    for it and for any server it left behind."""
    started = start_up(data_dir, *extra)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.process.send_signal(signal.SIGINT)
            try:
                started.process.wait(60)
            except subprocess.TimeoutExpired:
                started.process.kill()
                started.process.wait()
        for pid, _ in children_of_data_dir(data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProcess]:
    with running_up(tmp_path / "stack") as started:
        yield started


def test_up_serves_writes_env_file_and_stops_cleanly(
    up: UpProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    ready = up.wait_for(READY_LINE, timeout=60)
    with capsys.disabled():
        print(f"\n[timing] gpuplane up: ready {ready:.2f}s after exec (budget 15s)")

    env_file = up.data_dir / "gpuplane.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = parse_env_file(env_file.read_text())
    assert values["GPUPLANE_ADDR"] == f"127.0.0.1:{up.port}"
    assert values["GPUPLANE_ALLOW_SIMULATED"] == "1"
    for name in ("GPUPLANE_API_KEY", "GPUPLANE_ADMIN_API_KEY", "GPUPLANE_PROVIDER_API_KEY"):
        assert values[name].startswith("gpk_"), name
    # The banner's last line is the grpcurl example: wait for it, since the pump thread
    # may not have read the whole banner yet when the ready line arrives.
    up.wait_for("grpcurl -plaintext", timeout=10)
    banner = "".join(up.output)
    assert f"set -a; . {env_file}; set +a" in banner
    # The dashboard's URL is in the banner, and it serves there (no session yet: 401).
    (url,) = re.findall(r"dashboard\s+(http://127\.0\.0\.1:\d+/)", banner)
    with pytest.raises(urllib.error.HTTPError) as no_session:
        urllib.request.urlopen(url + "auth/session", timeout=10)  # noqa: S310 - loopback
    assert no_session.value.code == 401

    grpcurl = Path(sys.executable).parent / "grpcurl"
    called = subprocess.run(
        [
            str(grpcurl),
            "-plaintext",
            "-H",
            f"authorization: Bearer {values['GPUPLANE_ADMIN_API_KEY']}",
            values["GPUPLANE_ADDR"],
            "gpuplane.v1.AdminService/WhoAmI",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["role"] == "ROLE_ADMIN"

    # The env file is all a client needs; its consumer and provider keys act as such.
    for key_name, role in (
        ("GPUPLANE_API_KEY", "consumer"),
        ("GPUPLANE_PROVIDER_API_KEY", "provider"),
    ):
        code = main(
            ["--env-file", str(env_file), "--api-key", values[key_name], "whoami"], environ={}
        )
        assert code == 0
        assert f"role {role}" in capsys.readouterr().out

    # One stack per data dir.
    second = start_up(up.data_dir)
    assert second.process.wait(60) == 2
    assert "already running" in "".join(second.output)

    assert children_of_data_dir(up.data_dir), "nats-server and weed should be running"
    began = time.monotonic()
    assert up.interrupt() == 0, "".join(up.output)
    with capsys.disabled():
        print(f"[timing] gpuplane up: stopped {time.monotonic() - began:.2f}s after SIGINT")
    assert "stopped." in "".join(up.output)
    assert children_of_data_dir(up.data_dir) == []


def test_up_again_reuses_tenants_and_keys(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    env_file = data_dir / "gpuplane.env"
    first: dict[str, str] = {}
    for round_ in range(2):
        with running_up(data_dir) as run:
            run.wait_for(READY_LINE, timeout=60)
            values = parse_env_file(env_file.read_text())
            if round_ == 0:
                first = values
            else:
                for name in (
                    "GPUPLANE_API_KEY",
                    "GPUPLANE_ADMIN_API_KEY",
                    "GPUPLANE_PROVIDER_API_KEY",
                ):
                    assert values[name] == first[name], name
            assert run.interrupt() == 0
    assert children_of_data_dir(data_dir) == []


@pytest.mark.docker
@pytest.mark.timeout(300)
def test_up_demo_runs_a_job_and_the_cli_follows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_up(tmp_path / "stack", "--demo") as run:
        run.wait_for(" earnings: ", timeout=240)  # the demo's last line
        output = "".join(run.output)
        assert "SUCCEEDED  exit 0" in output
        assert "hello from a gpuplane job" in output
        assert "output/result.txt: the answer is 42" in output
        assert "job cost: " in output
        env_file = str(run.data_dir / "gpuplane.env")
        values = parse_env_file(Path(env_file).read_text())

        def cli(*argv: str, key: str = "GPUPLANE_API_KEY") -> tuple[int, str, str]:
            capsys.readouterr()
            code = main(["--env-file", env_file, "--api-key", values[key], *argv], environ={})
            captured = capsys.readouterr()
            return code, captured.out, captured.err

        code, out, _ = cli("jobs", "list", "--json")
        jobs = json.loads(out)
        assert [j["state"] for j in jobs] == ["JOB_STATE_SUCCEEDED"]
        job_id = jobs[0]["job_id"]
        code, out, _ = cli("jobs", "logs", job_id)
        assert code == 0
        assert "hello from a gpuplane job" in out
        code, out, _ = cli("jobs", "watch", job_id)
        assert code == 0
        assert out.splitlines()[-1].endswith("SUCCEEDED  exit 0")
        code, out, err = cli("jobs", "results", job_id, "--download", str(tmp_path / "results"))
        assert code == 0, err
        assert (tmp_path / "results" / "output" / "result.txt").read_text() == "the answer is 42\n"
        code, out, _ = cli("jobs", "get", job_id)
        assert "State:" in out
        assert "SUCCEEDED" in out

        code, out, _ = cli("jobs", "submit", "--image", TEST_IMAGE, "--max-duration", "1m",
                           "--wait", "--", "sh", "-c", "echo failing; exit 3")  # fmt: skip
        assert code == 9, out
        assert "FAILED" in out
        assert "exit code 3" in out
        assert "failing" in out

        code, out, _ = cli(
            "jobs",
            "submit",
            "--image",
            TEST_IMAGE,
            "--max-duration",
            "2m",
            "--json",
            "--",
            "sleep",
            "60",
        )
        assert code == 0
        sleeper = json.loads(out)["job_id"]
        code, out, _ = cli("jobs", "cancel", sleeper, "--reason", "test")
        assert code == 0
        code, out, _ = cli("jobs", "watch", sleeper)
        assert code == 9
        assert "CANCELLED" in out.splitlines()[-1]

        provider = "GPUPLANE_PROVIDER_API_KEY"
        code, out, _ = cli("hosts", "list", "--json", key=provider)
        hosts = json.loads(out)
        assert [h["state"] for h in hosts] == ["HOST_STATE_ONLINE"]
        host_id = hosts[0]["host_id"]
        code, out, _ = cli("hosts", "get", host_id, key=provider)
        assert code == 0
        assert "Simulated GPUs:  yes" in out
        assert "NVIDIA A100-SXM4-80GB" in out
        code, out, _ = cli("hosts", "drain", host_id, "--reason", "maintenance", key=provider)
        assert code == 0
        assert "DRAIN" in out
        code, out, _ = cli("hosts", "undrain", host_id, key=provider)
        assert code == 0
        assert "ONLINE" in out
        code, out, _ = cli("offers")
        assert code == 0
        code, out, err = cli("ledger", "usage")
        # LedgerService.GetUsage may still answer UNIMPLEMENTED (exit 8) in this build.
        assert code in (0, 8), err
        assert code == 8 or "total:" in out
        code, out, _ = cli("ledger", "check", key="GPUPLANE_ADMIN_API_KEY")
        assert code == 0, out

        assert run.interrupt(timeout=60) == 0, "".join(run.output)
    assert children_of_data_dir(run.data_dir) == []


def test_busy_port_falls_back_to_any() -> None:
    port = free_port()
    assert port_or_free(port) == port
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        assert port_or_free(port) == 0
