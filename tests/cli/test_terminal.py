"""The CLI on a real terminal (a pty of 80 columns, TERM=xterm): tables fit its width with
short ids and coloured states; piped, the same command prints plain text with full ids."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

from tests.cli.conftest import CLI, Cli, Served
from tests.cli.test_short_ids import funded_consumer, submit

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG_IMAGE = "registry.example.com/research/vision/very-long-training-image-name:2026-12-06-rc1"


def _env(served: Served, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
    env = {k: v for k, v in env.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(
        GPUPLANE_ADDR=served.addr, GPUPLANE_API_KEY=key, GPUPLANE_PLAINTEXT="1", TERM="xterm"
    )
    return env


def run_in_pty(argv: list[str], env: dict[str, str], columns: int = 80) -> tuple[int, str]:
    """Runs `argv` with a pty of `columns` × 24 as its stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = process.wait(30)
    return code, b"".join(chunks).decode()


def read_until(master: int, pattern: str, timeout: float = 20) -> str:
    """What the pty shows until `pattern` (a regex) appears in it."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        assert left > 0, f"{pattern!r} not seen in {seen!r}"
        if select.select([master], [], [], left)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            seen += data
    return seen.decode(errors="replace")


def test_waiting_shows_a_spinner_with_the_time_in_the_state(cli: Cli, served: Served) -> None:
    _, key = funded_consumer(cli, served)
    job_id = submit(cli, key)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    argv = [*CLI, "jobs", "watch", job_id[4:12]]
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=_env(served, key))
    os.close(slave)
    try:
        # The event line, then a spinner frame (braille "dots") with the time in QUEUED.
        shown = read_until(master, r"QUEUED for [1-9]s")
        assert re.search(r"attempt \d+\s+QUEUED", shown), shown
        assert re.search(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] QUEUED for [1-9]s", shown), shown
        assert cli("jobs", "cancel", job_id, key=key).code == 0
        shown = read_until(master, r"CANCELLED")
        assert process.wait(20) == 9  # watched to its end, which is not SUCCEEDED
    finally:
        process.kill()
        os.close(master)


def test_jobs_list_fits_an_80_column_terminal(cli: Cli, served: Served) -> None:
    _, key = funded_consumer(cli, served)
    jobs = [submit(cli, key, LONG_IMAGE) for _ in range(3)]
    cancelled = cli("jobs", "cancel", jobs[0], key=key)
    assert cancelled.code == 0, cancelled.err

    code, screen = run_in_pty([*CLI, "jobs", "list"], _env(served, key))
    assert code == 0, screen
    lines = [ANSI.sub("", line) for line in screen.replace("\r\n", "\n").splitlines()]
    assert lines[0].split() == ["JOB", "STATE", "IMAGE", "GPUS", "HOST", "CREATED", "CHARGED"]
    assert len(lines) == 4, screen
    assert all(len(line) <= 80 for line in lines), lines
    for job_id in jobs:
        assert job_id not in screen  # the full id is not shown; its first 12 characters are
        assert any(line.startswith(job_id[:12] + " ") for line in lines), (job_id, lines)
    assert "…" in screen  # the image was cut, not wrapped
    assert "\x1b[36mQUEUED" in screen  # cyan
    assert "\x1b[35mCANCELLED" in screen  # magenta

    # A narrower terminal still gets no line longer than itself.
    code, narrow = run_in_pty([*CLI, "jobs", "list"], _env(served, key), columns=60)
    assert code == 0, narrow
    assert all(len(ANSI.sub("", line)) <= 60 for line in narrow.splitlines()), narrow

    piped = subprocess.run(
        [*CLI, "jobs", "list"], env=_env(served, key), capture_output=True, text=True, check=True
    )
    assert "\x1b" not in piped.stdout
    assert all(job_id in piped.stdout for job_id in jobs)
    assert LONG_IMAGE in piped.stdout
