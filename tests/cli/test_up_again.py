"""`gpuplane up --demo` again on one data dir: after Ctrl-C, and after a SIGKILL of the first."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cli.test_up import UpProcess, children_of_data_dir, running_up

READY = "Ctrl-C stops everything."
DEMO_DONE = " earnings: "  # the demo's last line
STOP_BUDGET = 5.0
IDLE = 12.0


def error_lines(data_dir: Path) -> list[str]:
    log = (data_dir / "logs" / "gpuplane.log").read_text()
    return [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]


def stop_steps(data_dir: Path) -> str:
    """The log's lines timing the steps of a stop (gpuplane up's, the daemon's and the
    control plane's slow ones): what a slow stop is read by."""
    log = (data_dir / "logs" / "gpuplane.log").read_text()
    return "\n".join(line for line in log.splitlines() if " stop" in line and " took " in line)


def demo_ran_a_job(run: UpProcess) -> None:
    output = "".join(run.output)
    assert "SUCCEEDED  exit 0" in output, output
    assert "output/result.txt: the answer is 42" in output, output


def finish(run: UpProcess, timeout: float = 120) -> None:
    """Waits for `up --demo --exit` to end by itself, successfully."""
    assert run.process.wait(timeout) == 0, "".join(run.output)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ctrl_c_stops_within_5s_and_a_second_demo_runs_a_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "stack"
    with running_up(data_dir, "--demo") as first:
        first.wait_for(READY, timeout=120)
        demo_ran_a_job(first)
        # An idle daemon: its dispatch fetches (5 s each) have timed out a few times. A
        # drain of its NATS connection then waited out its whole 30 s timeout.
        time.sleep(IDLE)
        began = time.monotonic()
        assert first.interrupt(timeout=60) == 0, "".join(first.output)
        took = time.monotonic() - began
    with capsys.disabled():
        print(f"\n[timing] gpuplane up --demo: stopped {took:.2f}s after SIGINT (budget 5s)")
    steps = stop_steps(data_dir)
    assert "stopping: the control plane took " in steps  # the steps say what they took
    assert took < STOP_BUDGET, f"{steps}\n{''.join(first.output)}"
    assert error_lines(data_dir) == []
    assert children_of_data_dir(data_dir) == []
    first_nats = json.loads((data_dir / "daemon" / "host.json").read_text())["nats_servers"]

    # The second stack's NATS listens on another port: the daemon (same host.json) learns
    # it from the control plane and takes the demo's job.
    with running_up(data_dir, "--demo", "--exit") as second:
        finish(second)
    demo_ran_a_job(second)
    now_nats = json.loads((data_dir / "daemon" / "host.json").read_text())["nats_servers"]
    assert now_nats != first_nats
    assert "NATS servers moved" in (data_dir / "logs" / "gpuplane.log").read_text()
    assert error_lines(data_dir) == []
    assert children_of_data_dir(data_dir) == []


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_up_after_a_sigkill_of_the_first_stops_its_leftovers(tmp_path: Path) -> None:
    data_dir = tmp_path / "stack"
    with running_up(data_dir, "--demo") as first:
        first.wait_for(READY, timeout=120)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        left = {pid for pid, _ in children_of_data_dir(data_dir)}
        assert left, "nats-server, weed and dockerd outlive a SIGKILL of `up`"
        pid_files = sorted(p.name for p in data_dir.glob("*/*.pid"))
        assert pid_files == ["dockerd.pid", "nats-server.pid", "weed.pid"]

        with running_up(data_dir, "--demo", "--exit") as second:
            finish(second)
    output = "".join(second.output)
    assert "stopped servers an earlier run left running: " in output
    for name in ("dockerd (pid", "nats-server (pid", "weed mini) (pid"):
        assert name in output, output
    demo_ran_a_job(second)
    for pid in left:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"pid {pid} still runs"
    assert children_of_data_dir(data_dir) == []
    assert list(data_dir.glob("*/*.pid")) == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_stale_pid_file_is_removed_and_names_nothing(tmp_path: Path) -> None:
    """A PID file whose process is gone (or whose pid now names another process) is tidied
    away, never acted on."""
    from devstack import find_leftovers

    (tmp_path / "nats").mkdir()
    stale = tmp_path / "nats" / "nats-server.pid"
    record = {"name": "nats-server", "pid": os.getpid(), "started": 1, "executable": "x"}
    stale.write_text(json.dumps(record))
    not_ours = tmp_path / "nats" / "other.pid"
    not_ours.write_text("12345\n")
    assert find_leftovers(tmp_path) == []
    assert not stale.exists()
    assert not_ours.exists()
