"""`gpuplane daemon run --metrics-addr`: a malformed address or one already taken is a usage
error (exit 2) naming the setting or the address, before the daemon registers or runs."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.settings import DaemonSettings

pytestmark = pytest.mark.timeout(60)
GPUPLANE = str(Path(sys.executable).parent / "gpuplane")


def run(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [
        GPUPLANE, "daemon", "run", "--data-dir", str(tmp_path / "daemon"),
        "--simulate-gpus", "1xA100-80GB", "--plaintext", "--control-plane", "127.0.0.1:9",
        "--token", "grt_unused", *flags,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("addr", ["9466", "localhost:http", "127.0.0.1:70000", "host:"])
def test_a_malformed_address_names_the_setting(tmp_path: Path, addr: str) -> None:
    with pytest.raises(ValidationError, match="metrics_addr"):
        DaemonSettings(metrics_addr=addr, data_dir=tmp_path)
    done = run(tmp_path, "--metrics-addr", addr)
    assert done.returncode == 2, done.stderr
    assert "invalid daemon settings: metrics_addr: " in done.stderr
    assert "HOST:PORT" in done.stderr


def test_well_formed_addresses_are_accepted(tmp_path: Path) -> None:
    for addr in ("", "127.0.0.1:9466", ":9466", "0.0.0.0:0", "[::1]:9466"):
        assert DaemonSettings(metrics_addr=addr, data_dir=tmp_path).metrics_addr == addr


def test_a_taken_address_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        done = run(tmp_path, "--metrics-addr", addr)
    assert done.returncode == 2, done.stderr
    assert f"error: cannot serve metrics on {addr}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
