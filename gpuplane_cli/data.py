"""`gpuplane data put|ls|rm`: the caller's input area, uploaded through presigned PUT URLs."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import grpc
from gpuplane.v1 import data_pb2, types_pb2

from gpuplane_cli import args as a
from gpuplane_cli.client import (
    DEFAULT_TIMEOUT,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Client,
    CliError,
    Context,
    all_pages,
)
from gpuplane_cli.output import print_json, print_listing, table, when
from gpuplane_cli.units import format_bytes

# A file larger than this goes up in parts of this size (multipart), each its own PUT.
DEFAULT_PART_SIZE = 64 * 1024**2
# The most parts DataService takes for one upload.
MAX_PARTS = 1_000
# A floor for how fast the control plane reads an object back when an upload completes.
READ_BACK_BYTES_PER_SECOND = 20 * 1024**2
# The most one upload carries (S3's limit for a multipart upload; DataService checks it).
MAX_UPLOAD_BYTES = 5 * 1024**4
CHUNK = 1 << 20
# `jobs submit --input` uploads a local file under this prefix, named by its content, so that
# a queued job's input is never replaced by a later upload of another file of the same name.
UPLOADS_PREFIX = "uploads"


def register(subparsers: a.Subparsers, common: argparse.ArgumentParser) -> None:
    data = a.add_group(subparsers, "data", "your input data: upload, list, delete")
    put = a.add_leaf(
        data,
        "put",
        put_data,
        "upload a local file to your input area",
        common,
        epilog="Jobs read it with `jobs submit --input KEY[:PATH]`; the daemon checks its SHA-256.",
    )
    put.add_argument("local", metavar="LOCAL", help="the file to upload")
    put.add_argument(
        "input_key", metavar="KEY", nargs="?", help="its key (default: the file's name)"
    )
    put.add_argument(
        "--part-size",
        type=a.size,
        default=DEFAULT_PART_SIZE,
        help="larger files go up in parts of this size, 5m to 5g (default 64m)",
    )
    put.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    listing = a.add_leaf(data, "ls", list_data, "list your inputs in key order", common)
    listing.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    listing.add_argument("--limit", type=a.non_negative, default=0, help="0 = all (default)")
    remove = a.add_leaf(data, "rm", remove_data, "delete inputs", common)
    remove.add_argument("input_keys", metavar="KEY", nargs="+")


class Progress:
    """A one-line progress bar on a terminal stream; silent when disabled."""

    def __init__(self, label: str, total: int, out: TextIO | None, width: int = 30) -> None:
        self.label, self.total, self.out, self.width = label, total, out, width
        self.done = 0
        self._shown = 0.0

    def advance(self, size: int) -> None:
        self.done += size
        now = time.monotonic()
        if self.out is not None and (now - self._shown > 0.1 or self.done >= self.total):
            self._shown = now
            share = self.done / self.total if self.total else 1.0
            bar = "#" * int(share * self.width)
            self.out.write(
                f"\r{self.label} [{bar.ljust(self.width)}] {share:4.0%} "
                f"{format_bytes(self.done)}/{format_bytes(self.total)}"
            )
            self.out.flush()

    def finish(self) -> None:
        if self.out is not None:
            self.out.write("\n")
            self.out.flush()


class _HashingBody:
    """A request body urllib sends: the next `limit` bytes of the file, hashed (into the
    whole file's digest) and counted as they are read."""

    def __init__(self, handle: BinaryIO, limit: int, digest: Any, progress: Progress) -> None:
        self.handle, self.left, self.digest, self.progress = handle, limit, digest, progress

    def read(self, size: int = -1) -> bytes:
        want = min(size if size and size > 0 else CHUNK, self.left)
        data = self.handle.read(want)
        self.left -= len(data)
        self.digest.update(data)
        self.progress.advance(len(data))
        return data


def _send(url: str, body: _HashingBody, size: int) -> str:
    """PUTs `size` bytes of `body` to a presigned URL; returns the response's ETag."""
    request = urllib.request.Request(url, data=body, method="PUT")
    request.add_header("Content-Length", str(size))
    request.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            return str(response.headers.get("ETag", ""))
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise CliError(f"upload refused by object storage: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"object storage unreachable: {exc}", EXIT_UNAVAILABLE) from None


def _put(
    created: data_pb2.CreateUploadResponse, path: Path, size: int, progress: Progress
) -> tuple[str, list[data_pb2.UploadedPart]]:
    """PUTs the file (whole, or part by part); returns its SHA-256 and the parts sent."""
    digest = hashlib.sha256()
    parts: list[data_pb2.UploadedPart] = []
    with path.open("rb") as handle:
        if not created.upload_id:
            _send(created.url, _HashingBody(handle, size, digest, progress), size)
            return digest.hexdigest(), parts
        for number, url in enumerate(created.part_urls, start=1):
            length = min(created.part_size_bytes, size - (number - 1) * created.part_size_bytes)
            etag = _send(url, _HashingBody(handle, length, digest, progress), length)
            parts.append(data_pb2.UploadedPart(part_number=number, etag=etag))
    return digest.hexdigest(), parts


def local_file(text: str, flag: str) -> Path:
    """The regular file `text` names, or a CliError naming `flag`."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise CliError(f"{flag}: {text} is not a file", EXIT_USAGE)
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise CliError(f"{flag}: {text} is over 5 TiB, the most one upload carries", EXIT_USAGE)
    return path


def part_size_for(size: int, requested: int) -> int:
    """0 (one PUT) for a file of at most `requested` bytes, else the part size: `requested`,
    or larger for a file that would need more than MAX_PARTS parts (whole MiB)."""
    if size <= requested:
        return 0
    mib = 1024**2
    return max(requested, -(-size // (MAX_PARTS * mib)) * mib)


async def upload(
    client: Client,
    path: Path,
    key: str,
    progress_to: TextIO | None,
    part_size: int = DEFAULT_PART_SIZE,
) -> data_pb2.InputObject:
    """Uploads `path` to `key` in the caller's input area, in parts of `part_size` when it is
    larger, and has the control plane record it (it reads the object back and refuses bytes
    that do not hash as sent)."""
    size = path.stat().st_size
    request = data_pb2.CreateUploadRequest(key=key, size_bytes=size)
    request.part_size_bytes = part_size_for(size, part_size)
    created = await client.call(client.data.CreateUpload, request)
    progress = Progress(key, size, progress_to)
    try:
        sha256, parts = await asyncio.to_thread(_put, created, path, size, progress)
    except BaseException:
        if created.upload_id:  # leave no parts behind
            abort = data_pb2.AbortUploadRequest(key=key, upload_id=created.upload_id)
            with contextlib.suppress(grpc.RpcError):
                await client.call(client.data.AbortUpload, abort)
        raise
    finally:
        progress.finish()
    request_done = data_pb2.CompleteUploadRequest(
        key=key, sha256=sha256, upload_id=created.upload_id, parts=parts
    )
    # The control plane reads the whole object back to hash it: allow for that.
    timeout = (client.timeout or DEFAULT_TIMEOUT) + size / READ_BACK_BYTES_PER_SECOND
    done = await client.data.CompleteUpload(request_done, metadata=client.metadata, timeout=timeout)
    return done.input


def _progress_stream(choice: bool | None) -> TextIO | None:
    show = sys.stderr.isatty() if choice is None else choice
    return sys.stderr if show else None


async def put_data(args: argparse.Namespace, ctx: Context) -> int:
    path = local_file(args.local, "LOCAL")
    key = args.input_key or path.name
    recorded = await upload(
        ctx.client(), path, key, _progress_stream(args.progress), args.part_size
    )
    if ctx.json:
        print_json(recorded)
    else:
        print(f"{recorded.key} {format_bytes(recorded.size_bytes)} sha256 {recorded.sha256}")
    return EXIT_OK


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_local(text: str) -> bool:
    """Whether an --input names a local file rather than a key: it starts with "./", "../",
    "/" or "~" (no valid key does)."""
    return text.startswith(("./", "../", "/", "~"))


async def upload_for_job(
    client: Client, path: Path, progress_to: TextIO | None, *, dry_run: bool = False
) -> str:
    """The key of a local file in the input area, `uploads/<sha256>/<name>`: uploaded unless
    a file with the same content and name was recorded already (or `dry_run`)."""
    key = f"{UPLOADS_PREFIX}/{await asyncio.to_thread(file_sha256, path)}/{path.name}"
    if dry_run:
        return key
    listed = await client.call(
        client.data.ListInputs, data_pb2.ListInputsRequest(prefix=key, page_size=1)
    )
    if not any(item.key == key for item in listed.inputs):
        await upload(client, path, key, progress_to)
    return key


async def list_data(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()

    async def fetch(token: str, size: int) -> tuple[Sequence[data_pb2.InputObject], str]:
        request = data_pb2.ListInputsRequest(prefix=args.prefix, page_size=size, page_token=token)
        response = await client.call(client.data.ListInputs, request)
        return response.inputs, response.next_page_token

    inputs, more = await all_pages(fetch, args.limit)
    print_listing(
        inputs, _inputs_table, json_out=ctx.json, more=more, limit=args.limit, noun="inputs"
    )
    return EXIT_OK


def _inputs_table(inputs: Sequence[data_pb2.InputObject]) -> str:
    return table(
        ["KEY", "SIZE", "SHA256", "UPLOADED"],
        [(i.key, format_bytes(i.size_bytes), i.sha256, when(i.uploaded_at)) for i in inputs],
    )


async def remove_data(args: argparse.Namespace, ctx: Context) -> int:
    client = ctx.client()
    for key in args.input_keys:
        await client.call(client.data.DeleteInput, data_pb2.DeleteInputRequest(key=key))
        if not ctx.json:
            print(f"deleted {key}")
    return EXIT_OK


async def upload_local_inputs(
    ctx: Context, inputs: Sequence[types_pb2.JobInput], dry_run: bool
) -> None:
    """Uploads each --input that names a local file and puts its key in its place."""
    for item in inputs:
        if is_local(item.key):
            path = local_file(item.key, "--input")
            progress = None if ctx.json else _progress_stream(None)
            item.key = await upload_for_job(ctx.client(), path, progress, dry_run=dry_run)
