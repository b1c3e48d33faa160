"""Fetches a job's inputs from the tenant's input area into the attempt's /input directory."""

from __future__ import annotations

import shutil
from pathlib import Path, PurePosixPath
from typing import Protocol

from gpuplane.v1 import types_pb2

from storage.layout import input_key
from storage.objects import ObjectNotFound, StorageError, StoredObject


def make_work_dir(work_dir: Path) -> None:
    """An attempt's fresh work dir: /input (read-only to the job) and /output (blocking)."""
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True, mode=0o700)
    (work_dir / "input").mkdir(mode=0o755)
    output = work_dir / "output"
    output.mkdir()
    # The job may run as any user, without CAP_DAC_OVERRIDE: /output must be writable.
    output.chmod(0o777)


class ObjectReader(Protocol):
    """Where inputs come from: the attempt's grant (`GrantedStore`) or, in tests, the bucket."""

    async def download_file(self, key: str, path: Path) -> StoredObject: ...


class InputError(Exception):
    """An input could not be placed under /input for the job's reasons (a bad path, a key
    that is not in the tenant's input area); the message is for the job's owner."""


class InputFetchFailed(Exception):
    """An input exists but could not be fetched for the host's reasons (object storage
    unreachable from the host, its disk): the host's fault, retried elsewhere."""


class InputCorrupt(InputError):
    """An input's fetched bytes do not hash to the SHA-256 its job carries."""


def input_path(item: types_pb2.JobInput) -> PurePosixPath:
    """Where the input goes under /input: `path`, else the key's last segment. It must be a
    relative path that stays under /input."""
    raw = item.path or item.key.rstrip("/").rsplit("/", 1)[-1]
    path = PurePosixPath(raw)
    if not raw or path.is_absolute() or ".." in path.parts or path == PurePosixPath("."):
        raise InputError(
            f"input '{item.key}': path '{raw}' must be a relative path that stays under /input"
        )
    return path


async def fetch_inputs(
    store: ObjectReader, tenant_id: str, inputs: list[types_pb2.JobInput], input_dir: Path
) -> int:
    """Downloads every input (validated first, so a bad path fails before any transfer),
    checking each against its `sha256` where the job carries one; returns the bytes fetched."""
    placed = [(item, input_path(item)) for item in inputs]
    seen: set[PurePosixPath] = set()
    for item, path in placed:
        if path in seen:
            raise InputError(f"input '{item.key}': path '{path}' is given twice")
        seen.add(path)
    total = 0
    for item, path in placed:
        target = input_dir.joinpath(*path.parts)
        try:
            fetched = await store.download_file(input_key(tenant_id, item.key), target)
        except ObjectNotFound as exc:
            raise InputError(f"input '{item.key}' does not exist in your input area") from exc
        except (StorageError, OSError) as exc:
            raise InputFetchFailed(f"input '{item.key}' could not be fetched: {exc}") from exc
        if item.sha256 and fetched.sha256 != item.sha256:
            target.unlink(missing_ok=True)
            raise InputCorrupt(
                f"input '{item.key}' is corrupt: its {fetched.size_bytes} bytes hash to "
                f"sha256 {fetched.sha256}, not {item.sha256} as recorded when it was uploaded"
            )
        total += fetched.size_bytes
    return total
