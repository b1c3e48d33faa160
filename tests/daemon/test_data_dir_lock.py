"""One daemon per data dir: `gpuplane daemon run` on a data dir another daemon holds exits with
one line naming the dir and the holder's pid; the lock goes with its holder, however it ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from daemon.cli import EXIT_USAGE, LOCK_FILE
from devstack import DockerEngine, free_port
from messaging.dirlock import DirLocked, lock_dir

pytestmark = [pytest.mark.timeout(90), pytest.mark.docker]

GPUPLANE = Path(sys.executable).parent / "gpuplane"


def daemon_argv(data_dir: Path, *extra: str) -> list[str]:
    """`gpuplane daemon run` on simulated GPUs against a control plane nobody serves."""
    address = f"127.0.0.1:{free_port()}"
    argv = [str(GPUPLANE), "daemon", "run", "--plaintext", "--control-plane", address]
    return [*argv, "--simulate-gpus", "1xL4", "--data-dir", str(data_dir), *extra]


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GPUPLANE_")}
    return {**env, "GPUPLANE_DAEMON_RECONNECT_MAX_SECONDS": "1"}


@contextmanager
def running_daemon(
    data_dir: Path, log: Path, engine: DockerEngine
) -> Iterator[subprocess.Popen[bytes]]:
    """A real daemon with a token and a Docker engine (it checks one answers before it spends
    the token), retrying its registration (the control plane is down): it holds its data dir
    from the moment its pid is in the lock file."""
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            daemon_argv(data_dir, "--token", "grt_first", "--docker-host", engine.base_url),
            env=daemon_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        lock_file = data_dir / LOCK_FILE
        while not (lock_file.exists() and lock_file.read_text().strip() == str(daemon.pid)):
            assert daemon.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the daemon did not take its data dir's lock"
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.kill()
        daemon.wait()


def run_second(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        daemon_argv(data_dir, *extra),
        env=daemon_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_second_daemon_on_a_held_data_dir_exits_naming_dir_and_holder(
    tmp_path: Path, docker_engine: DockerEngine
) -> None:
    data_dir = tmp_path / "daemon"
    with running_daemon(data_dir, tmp_path / "first.log", docker_engine) as first:
        second = run_second(data_dir, "--token", "grt_second")
        assert second.returncode == EXIT_USAGE, second.stderr
        assert "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: another daemon (pid {first.pid}) is running on the data dir {data_dir}; "
            "stop it or give this one another --data-dir"
        ]
        assert first.poll() is None, "the daemon holding the data dir runs on"
        # The lock is taken before anything else touches the data dir: the pid is the first's.
        assert (data_dir / LOCK_FILE).read_text().strip() == str(first.pid)
        with pytest.raises(DirLocked) as locked:
            lock_dir(data_dir, LOCK_FILE)
        assert locked.value.holder_pid == str(first.pid)


def test_lock_goes_with_a_killed_holder(tmp_path: Path, docker_engine: DockerEngine) -> None:
    data_dir = tmp_path / "daemon"
    with running_daemon(data_dir, tmp_path / "first.log", docker_engine) as first:
        first.kill()
        first.wait()
    # Its lock file stays behind, naming the dead pid; it is no lock (flock ends with its holder).
    assert (data_dir / LOCK_FILE).read_text().strip() == str(first.pid)
    lock = lock_dir(data_dir, LOCK_FILE)
    assert (data_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    lock.close()
    # A daemon now gets past the lock: without a token it stops at registration instead.
    next_one = run_second(data_dir)
    assert next_one.returncode == EXIT_USAGE, next_one.stderr
    assert "no registration token was given" in next_one.stderr
    assert "another daemon" not in next_one.stderr
    assert "Traceback" not in next_one.stderr
