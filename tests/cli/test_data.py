"""`gpuplane data put|ls|rm` and `jobs submit --input ./file` against a real control plane
and S3 (`gpuplane controlplane serve` in a child)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from gpuplane_cli.data import part_size_for
from tests.cli.conftest import Cli, Served
from tests.cli.test_commands import new_consumer


def inputs(cli: Cli, secret: str, *prefix: str) -> list[dict[str, Any]]:
    """`data ls --json` as data."""
    listed = cli("--json", "data", "ls", *prefix, key=secret).json()
    assert isinstance(listed, list)
    return listed


def _file(directory: Path, name: str, size: int) -> tuple[Path, str]:
    path = directory / name
    data = os.urandom(size)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_put_ls_rm(cli: Cli, served: Served, tmp_path: Path) -> None:
    _, secret = new_consumer(cli, served)
    path, sha = _file(tmp_path, "weights.bin", 3 * 1024 * 1024 + 5)
    put = cli("data", "put", str(path), key=secret)
    assert put.code == 0, put.err
    assert put.out.split() == ["weights.bin", "3.0MiB", "sha256", sha]
    named = cli("--json", "data", "put", str(path), "sets/a b.bin", key=secret)
    assert named.code == 0, named.err
    assert named.json()["key"] == "sets/a b.bin"  # type: ignore[index]
    listing = cli("data", "ls", key=secret)
    assert listing.out.splitlines()[0].split() == ["KEY", "SIZE", "SHA256", "UPLOADED"]
    assert [line.split()[0] for line in listing.out.splitlines()[1:]] == ["sets/a", "weights.bin"]
    as_json = inputs(cli, secret, "sets/")
    assert [(i["key"], i["sha256"]) for i in as_json] == [("sets/a b.bin", sha)]
    removed = cli("data", "rm", "weights.bin", "sets/a b.bin", key=secret)
    assert removed.code == 0, removed.err
    assert removed.out.splitlines() == ["deleted weights.bin", "deleted sets/a b.bin"]
    assert cli("--json", "data", "ls", key=secret).json() == []
    again = cli("data", "rm", "weights.bin", key=secret)
    assert again.code == 3
    assert again.err.startswith("error: NOT_FOUND: key: no input 'weights.bin'")


def test_progress_bar_and_bad_arguments(cli: Cli, served: Served, tmp_path: Path) -> None:
    _, secret = new_consumer(cli, served)
    path, _ = _file(tmp_path, "p.bin", 2 * 1024 * 1024)
    shown = cli("data", "put", "--progress", str(path), key=secret)
    assert shown.code == 0, shown.err
    last = shown.err.rstrip("\n").rsplit("\r", 1)[-1]
    assert last == "p.bin [" + "#" * 30 + "] 100% 2.0MiB/2.0MiB"
    quiet = cli("data", "put", str(path), key=secret)
    assert quiet.err == ""  # not a terminal: no bar
    escape = cli("data", "put", str(path), "../other-tenant/x", key=secret)
    assert escape.code == 2
    assert escape.err.startswith("error: INVALID_ARGUMENT: key: ")
    missing = cli("data", "put", str(tmp_path / "nope"), key=secret)
    assert missing.code == 2
    assert missing.err == f"error: LOCAL: {tmp_path / 'nope'} is not a file\n"
    assert [i["key"] for i in inputs(cli, secret)] == ["p.bin"]


def test_submit_uploads_local_inputs_first(
    cli: Cli, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, secret = new_consumer(cli, served)
    deposit = cli("ledger", "deposit", "10", "--tenant", tenant, "--reference", "data",
                  key=served.admin_key)  # fmt: skip
    assert deposit.code == 0, deposit.err
    monkeypatch.chdir(tmp_path)
    _, sha = _file(tmp_path, "train.bin", 4096)
    submit = ["jobs", "submit", "--image", "busybox", "--max-price", "1", "--max-duration", "1m"]
    quote = cli(*submit, "--dry-run", "--input", "./train.bin", key=secret)
    assert quote.code == 0, quote.err
    assert cli("--json", "data", "ls", key=secret).json() == []  # a quote uploads nothing
    made = cli("--json", *submit, "--input", "./train.bin:data/t.bin", key=secret)
    assert made.code == 0, made.err
    job = made.json()
    key = f"uploads/{sha}/train.bin"
    assert job["spec"]["inputs"] == [{"key": key, "path": "data/t.bin", "sha256": sha}]  # type: ignore[index]
    listed = inputs(cli, secret)
    assert [(i["key"], i["sha256"]) for i in listed] == [(key, sha)]
    # The same file again is not uploaded again (its record is unchanged).
    second = cli("--json", *submit, "--input", "./train.bin", key=secret)
    assert second.code == 0, second.err
    assert cli("--json", "data", "ls", key=secret).json() == listed
    gone = cli(*submit, "--input", "./missing.bin", key=secret)
    assert gone.code == 2
    assert gone.err == "error: --input: ./missing.bin is not a file\n"


def test_large_files_go_up_in_parts(cli: Cli, served: Served, tmp_path: Path) -> None:
    _, secret = new_consumer(cli, served)
    path, sha = _file(tmp_path, "big.bin", 11 * 1024 * 1024)
    put = cli("data", "put", "--part-size", "5m", "--progress", str(path), key=secret)
    assert put.code == 0, put.err
    assert put.out.split() == ["big.bin", "11.0MiB", "sha256", sha]
    assert put.err.rstrip("\n").endswith("] 100% 11.0MiB/11.0MiB")
    small_parts = cli("data", "put", "--part-size", "1m", str(path), key=secret)
    assert small_parts.code == 2
    assert small_parts.err.startswith("error: INVALID_ARGUMENT: part_size_bytes: ")


def test_part_sizes_keep_to_a_thousand_parts() -> None:
    mib, gib = 1024**2, 1024**3
    assert part_size_for(64 * mib, 64 * mib) == 0  # one PUT
    assert part_size_for(64 * mib + 1, 64 * mib) == 64 * mib
    assert part_size_for(100 * gib, 64 * mib) == 103 * mib  # ceil(102400 MiB / 1000)
    assert -(-100 * gib // part_size_for(100 * gib, 64 * mib)) <= 1000
