"""Uploads one attempt's outputs and logs, then its manifest (last), under the attempt prefix."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gpuplane.v1 import types_pb2

from storage import layout
from storage.objects import ObjectNotFound, ObjectStore, StorageError, StoredObject

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT_BYTES = 10 << 30
# Files uploaded at once; each is one streaming PUT (or a multipart upload) in a thread.
_PARALLEL_UPLOADS = 4


class OutputTooLarge(Exception):
    """The files under /output add up to more than the host accepts."""


class ManifestMismatch(StorageError):
    """A stored object's bytes differ from what the attempt's manifest says (size or
    SHA-256), or an object the manifest lists is missing."""


class ObjectWriter(Protocol):
    """Where an attempt's results go: the bucket itself (`ObjectStore`, with the control
    plane's key) or one attempt's grant (`GrantedStore`, the daemon's)."""

    async def put_file(self, key: str, path: Path) -> StoredObject: ...

    async def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> StoredObject: ...


@dataclass(frozen=True)
class OutputFile:
    """A regular file to upload: where it is on disk and its path relative to /output."""

    source: Path
    relative: str
    size_bytes: int


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def scan_outputs(output_dir: Path) -> list[OutputFile]:
    """Regular files under `output_dir`, sorted by relative path.

    Symlinks are followed only when their target resolves to a regular file inside
    `output_dir` (a job's absolute links name paths in its container, which mean something
    else on the host); links that escape, dangle or point at directories are skipped, and so
    are devices, fifos and sockets. Symlinked directories are not descended into.
    """
    root = os.path.realpath(output_dir)
    found: list[OutputFile] = []
    for directory, _subdirs, names in os.walk(root, followlinks=False):
        for name in names:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root)
            target = os.path.realpath(path)
            if not _inside(target, root) or not os.path.isfile(target):
                log.warning("output %r skipped: not a regular file inside /output", relative)
                continue
            found.append(OutputFile(Path(target), relative, os.stat(target).st_size))
    found.sort(key=lambda f: f.relative)
    return found


def _result(stored: StoredObject, path: str) -> types_pb2.ResultObject:
    return types_pb2.ResultObject(
        key=stored.key, path=path, size_bytes=stored.size_bytes, sha256=stored.sha256
    )


def _check_sizes(files: list[OutputFile], max_output_bytes: int, max_object_bytes: int) -> None:
    """OutputTooLarge when the outputs exceed `max_output_bytes` together, or one file
    `max_object_bytes` (when set)."""
    total = sum(f.size_bytes for f in files)
    if total > max_output_bytes:
        raise OutputTooLarge(
            f"/output holds {total} bytes in {len(files)} files, over this host's limit of "
            f"{max_output_bytes} bytes"
        )
    largest = max(files, key=lambda f: f.size_bytes, default=None)
    if max_object_bytes and largest is not None and largest.size_bytes > max_object_bytes:
        raise OutputTooLarge(
            f"/output/{largest.relative} holds {largest.size_bytes} bytes, over the "
            f"{max_object_bytes} bytes one output file may have"
        )


async def upload_attempt(
    store: ObjectWriter,
    job_id: str,
    attempt: int,
    output_dir: Path | None,
    logs: Mapping[str, bytes | Path],
    *,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    max_object_bytes: int = 0,
) -> list[types_pb2.ResultObject]:
    """Stores every file under `output_dir` and the `logs` ("stdout"/"stderr" → bytes or a
    file), then manifest.json listing them; returns the manifest entries, outputs first.

    The manifest is written last, so its presence means the attempt's results are complete.
    Re-running for the same attempt overwrites the same keys. Raises `OutputTooLarge`
    before uploading anything when the outputs exceed `max_output_bytes`, or one file exceeds
    `max_object_bytes` (when set: what one request of the attempt's grant may store).
    """
    files = await asyncio.to_thread(scan_outputs, output_dir) if output_dir is not None else []
    _check_sizes(files, max_output_bytes, max_object_bytes)
    limit = asyncio.Semaphore(_PARALLEL_UPLOADS)

    async def put_output(item: OutputFile) -> types_pb2.ResultObject:
        async with limit:
            key = layout.output_key(job_id, attempt, item.relative)
            return _result(await store.put_file(key, item.source), f"output/{item.relative}")

    async def put_log(stream: str, content: bytes | Path) -> types_pb2.ResultObject:
        async with limit:
            key = layout.log_key(job_id, attempt, stream)
            if isinstance(content, Path):
                stored = await store.put_file(key, content)
            else:
                stored = await store.put_bytes(key, content, "text/plain; charset=utf-8")
            return _result(stored, f"logs/{stream}")

    uploads = [put_output(f) for f in files]
    uploads += [put_log(stream, content) for stream, content in sorted(logs.items())]
    tasks = [asyncio.ensure_future(upload) for upload in uploads]
    try:
        manifest = list(await asyncio.gather(*tasks))
    except BaseException:
        # One failed (or we were cancelled): stop the others before reporting it.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    document = [
        {"key": o.key, "path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256}
        for o in manifest
    ]
    body = json.dumps(document, indent=2).encode()
    await store.put_bytes(layout.manifest_key(job_id, attempt), body, "application/json")
    return manifest


async def verify_attempt(
    store: ObjectStore, job_id: str, attempt: int
) -> list[types_pb2.ResultObject]:
    """Reads the attempt's manifest.json and every object it lists back from the store;
    returns the entries when each object's size and SHA-256 match. Raises
    `ManifestMismatch` naming the first object that differs or is missing (`ObjectNotFound`
    when there is no manifest, `StorageError` when the store cannot be read)."""
    document = json.loads(await store.get_bytes(layout.manifest_key(job_id, attempt)))
    entries = [types_pb2.ResultObject(**entry) for entry in document]
    limit = asyncio.Semaphore(_PARALLEL_UPLOADS)

    async def check(entry: types_pb2.ResultObject) -> None:
        async with limit:
            try:
                size, sha256 = await store.digest(entry.key)
            except ObjectNotFound as exc:
                raise ManifestMismatch(f"'{entry.key}' is in the manifest but not stored") from exc
        if (size, sha256) != (entry.size_bytes, entry.sha256):
            raise ManifestMismatch(
                f"'{entry.key}' does not match the manifest: stored {size} bytes with sha256 "
                f"{sha256}, manifest says {entry.size_bytes} bytes with sha256 {entry.sha256}"
            )

    outcomes = await asyncio.gather(*(check(entry) for entry in entries), return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return entries
