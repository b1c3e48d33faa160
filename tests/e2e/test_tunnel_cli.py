"""The real `gpuplane exec`, `shell` and `port-forward` against a running busybox job: a
script's output and exit status, an interactive terminal driven through a pty (a line read
back, a resize seen by `stty size`, Ctrl-C interrupting `sleep`, the exit code), HTTP through
a forwarded port, and `--stdio` as an ssh-style ProxyCommand would use it."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pytest

from devstack import DockerEngine, NatsServer, S3Server
from devstack.sshimage import SSHD_TEST_IMAGE, build_sshd_image, sshd_script
from tests.e2e.tunnelstack import (
    CLI,
    ECHO_PORT,
    HTTP_PORT,
    INDEX,
    TunnelStack,
    cli_env,
    tunnel_stack,
    wait_listening,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]


SSH_PORT = 2222


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30
    )
    return key


@pytest.fixture(scope="module")
async def stack(
    tmp_path_factory: pytest.TempPathFactory,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    ssh_key: Path,
) -> AsyncIterator[TunnelStack]:
    """The job runs the busybox image with dropbear, serving SSH on 2222 to `ssh_key`."""
    image = await asyncio.to_thread(build_sshd_image, docker_client, SSHD_TEST_IMAGE)
    assert image
    sshd = sshd_script(ssh_key.with_suffix(".pub").read_text(), SSH_PORT) + " && "
    data_dir = tmp_path_factory.mktemp("tunnel-cli")
    async with tunnel_stack(
        data_dir, nats_server, s3_server, docker_engine, SSHD_TEST_IMAGE, sshd
    ) as s:
        await wait_listening(s, ECHO_PORT)
        await wait_listening(s, SSH_PORT)
        yield s


async def run_cli(stack: TunnelStack, *words: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *words,
        env=cli_env(stack),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_exec_script_mode(stack: TunnelStack) -> None:
    job = stack.job.job_id
    code, out, err = await run_cli(
        stack, "exec", job, "--", "sh", "-c", "echo hi; echo no >&2; exit 4"
    )
    assert (code, out, err) == (4, b"hi\n", b"no\n")
    code, out, _ = await run_cli(
        stack, "exec", job[:12], "-i", "--", "wc", "-c", stdin=b"x" * 100_000
    )
    assert (code, out.strip()) == (0, b"100000")


async def test_exec_without_a_command_names_it(stack: TunnelStack) -> None:
    code, _, err = await run_cli(stack, "exec", stack.job.job_id)
    assert code == 2
    assert b"--" in err


class Terminal:
    """A `gpuplane` process on a pty, read and written from a worker thread."""

    def __init__(self, words: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.resize(24, 80, slave)
        self.proc = subprocess.Popen(
            [*CLI, *words], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
        )
        os.close(slave)
        self.seen = b""

    def resize(self, rows: int, cols: int, fd: int | None = None) -> None:
        size = struct.pack("HHHH", rows, cols, 0, 0)
        fcntl.ioctl(self.master if fd is None else fd, termios.TIOCSWINSZ, size)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, wanted: bytes, timeout: float = 20) -> None:
        """Reads until `wanted` (or one of `|`-separated alternatives) was printed."""
        deadline = time.monotonic() + timeout
        choices = wanted.split(b"|")
        while not any(c in self.seen for c in choices):
            left = deadline - time.monotonic()
            assert left > 0, f"{wanted!r} not seen in {self.seen[-500:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # the process ended
                    assert any(c in self.seen for c in choices), f"{wanted!r} not seen"
        found = next(c for c in choices if c in self.seen)
        self.seen = self.seen[self.seen.index(found) + len(found) :]


def drive_shell(term: Terminal) -> int:
    term.expect(b"# |$ ")  # the shell's prompt: it reads the terminal now
    term.send(b"echo hel''lo\r")
    term.expect(b"hello\r\n")
    term.send(b"stty size\r")
    term.expect(b"24 80")
    term.resize(30, 100)
    term.proc.send_signal(signal.SIGWINCH)
    time.sleep(0.3)  # the resize travels as its own message; no event says it arrived
    term.send(b"stty size\r")
    term.expect(b"30 100")
    term.send(b"sleep 30; echo not-interrupted\r")
    time.sleep(0.5)
    term.send(b"\x03")
    term.send(b"echo after-$?\r")
    term.expect(b"after-130")
    term.send(b"exit 7\r")
    return term.proc.wait(timeout=20)


async def test_interactive_shell_through_a_pty(stack: TunnelStack) -> None:
    term = Terminal(["shell", stack.job.job_id], cli_env(stack))
    try:
        code = await asyncio.to_thread(drive_shell, term)
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)
    assert code == 7
    assert b"not-interrupted" not in term.seen


async def test_port_forward_serves_http(stack: TunnelStack) -> None:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "port-forward",
        stack.job.job_id,
        f"0:{HTTP_PORT}",
        env=cli_env(stack),
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        address = line.split()[1].decode()
        url = f"http://{address}/index.html"
        for _ in range(2):  # one call per connection
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=20).read())
            assert body == INDEX
    finally:
        proc.terminate()
        await proc.wait()


async def test_stdio_forward_as_a_proxy_command(stack: TunnelStack) -> None:
    """What OpenSSH does with a ProxyCommand: bytes in on stdin, out on stdout, to a TCP
    echo server (busybox nc) in the container."""
    payload = os.urandom(200_000)
    code, out, err = await run_cli(
        stack, "port-forward", "--stdio", stack.job.job_id, str(ECHO_PORT), stdin=payload
    )
    assert code == 0, err
    assert out == payload


async def test_bad_ports_name_the_argument(stack: TunnelStack) -> None:
    code, _, err = await run_cli(stack, "port-forward", stack.job.job_id, "8080:70000")
    assert code == 2
    assert b"REMOTE" in err


async def test_real_ssh_through_a_stdio_proxy_command(stack: TunnelStack, ssh_key: Path) -> None:
    """OpenSSH's client against dropbear in the container, its bytes carried by
    `gpuplane port-forward --stdio` as its ProxyCommand."""
    proxy = " ".join([*CLI, "port-forward", "--stdio", stack.job.job_id, str(SSH_PORT)])
    proc = await asyncio.create_subprocess_exec(
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        str(ssh_key),
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        f"ProxyCommand={proxy}",
        f"nobody@{stack.job.job_id}",  # the image's user
        "echo hello over ssh; exit 5",
        env=cli_env(stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode, out) == (5, b"hello over ssh\n"), err
