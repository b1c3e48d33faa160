"""The daemon's side of a storage grant: inputs by presigned GET, results by presigned POST."""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import uuid
from pathlib import Path
from typing import BinaryIO

import urllib3
from gpuplane.v1 import messaging_pb2

from storage.objects import ObjectNotFound, StorageError, StoredObject

_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")


class _FormBody(io.RawIOBase):
    """A multipart/form-data body streamed from a file: `head` (the form fields and the file
    part's header), the file's bytes (hashed as they go: SHA-256 for the manifest, MD5 for the
    server's ETag) and `tail` (the closing boundary)."""

    def __init__(self, head: bytes, handle: BinaryIO, tail: bytes) -> None:
        super().__init__()
        self._parts: list[BinaryIO] = [io.BytesIO(head), handle, io.BytesIO(tail)]
        self._index = 0
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        want = 1 << 20 if size is None or size < 0 else size
        while self._index < len(self._parts):
            data = self._parts[self._index].read(want)
            if data:
                if self._index == 1:
                    self.sha256.update(data)
                    self.md5.update(data)
                    self.size += len(data)
                return data
            self._index += 1
        return b""


def _error(response: urllib3.BaseHTTPResponse, what: str) -> StorageError:
    body = response.data or b""
    code = _CODE.search(body)
    message = _MESSAGE.search(body)
    detail = (code.group(1).decode() if code else f"HTTP {response.status}") + (
        f": {message.group(1).decode()}" if message else ""
    )
    if response.status == 404 or (code and code.group(1) in (b"NoSuchKey", b"NotFound")):
        return ObjectNotFound(f"{what}: {detail}")
    return StorageError(f"{what}: {detail}")


def _part(boundary: str, disposition: str, content_type: str = "") -> bytes:
    """A form part's opening: boundary and headers, up to the blank line's last CRLF."""
    typed = f"\r\nContent-Type: {content_type}" if content_type else ""
    return f"--{boundary}\r\nContent-Disposition: form-data; {disposition}{typed}\r\n".encode()


class GrantedStore:
    """Does what one attempt's `StorageGrant` allows, with no credentials of its own: fetch
    the inputs it names, store objects under the attempt's prefix. Anything else is refused
    by the S3 server (and a key the grant does not name is refused here first)."""

    def __init__(self, grant: messaging_pb2.StorageGrant, http: urllib3.PoolManager) -> None:
        self.grant = grant
        self.max_object_bytes = grant.max_object_bytes
        self._http = http

    async def download_file(self, key: str, path: Path) -> StoredObject:
        """Writes the input `key` to `path` (via a temporary file beside it), hashing it in
        the same pass; raises StorageError when the grant names no URL for it."""
        url = self.grant.input_urls.get(key)
        if not url:
            raise StorageError(f"'{key}': this attempt's storage grant does not cover it")
        return await asyncio.to_thread(self._download, key, url, path)

    def _download(self, key: str, url: str, path: Path) -> StoredObject:
        try:
            response = self._http.request("GET", url, preload_content=False)
        except urllib3.exceptions.HTTPError as exc:
            raise StorageError(f"'{key}': object storage unreachable: {exc}") from exc
        try:
            if response.status != 200:
                response.read()
                raise _error(response, f"'{key}'")
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.part")
            digest, size = hashlib.sha256(), 0
            try:
                with partial.open("wb") as handle:
                    for chunk in response.stream(1 << 20):
                        handle.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            partial.replace(path)
            return StoredObject(key, size, digest.hexdigest())
        except urllib3.exceptions.HTTPError as exc:
            raise StorageError(f"'{key}': reading it failed: {exc}") from exc
        finally:
            response.release_conn()

    async def put_file(self, key: str, path: Path) -> StoredObject:
        """Stores a local file under `key` in one POST, hashing it while it streams."""

        def put() -> StoredObject:
            with path.open("rb") as handle:
                return self._post(key, handle, path.stat().st_size, "application/octet-stream")

        return await asyncio.to_thread(put)

    async def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        return await asyncio.to_thread(self._post, key, io.BytesIO(data), len(data), content_type)

    def _post(self, key: str, handle: BinaryIO, length: int, content_type: str) -> StoredObject:
        if not self.grant.upload_url:
            raise StorageError(
                f"'{key}': the dispatch carries no storage grant (a control plane older than "
                "this daemon?), so nothing can be stored"
            )
        boundary = uuid.uuid4().hex
        fields = {**self.grant.upload_fields, "key": key, "Content-Type": content_type}
        head = b"".join(
            _part(boundary, f'name="{name}"') + f"\r\n{value}\r\n".encode()
            for name, value in fields.items()
        )
        head += _part(boundary, 'name="file"; filename="object"', content_type) + b"\r\n"
        tail = f"\r\n--{boundary}--\r\n".encode()
        body = _FormBody(head, handle, tail)
        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + length + len(tail)),
        }
        try:
            response = self._http.request(
                "POST", self.grant.upload_url, body=body, headers=headers, chunked=False
            )
        except urllib3.exceptions.HTTPError as exc:
            raise StorageError(f"'{key}': object storage unreachable: {exc}") from exc
        if response.status not in (200, 201, 204):
            raise _error(response, f"'{key}'")
        # For a single-request upload S3's ETag is the MD5 of the bytes it stored: what the
        # server kept is what was read here (the daemon cannot read its results back).
        etag = (response.headers.get("ETag") or "").strip('"')
        if etag != body.md5.hexdigest():
            raise StorageError(
                f"'{key}': the server stored other bytes (ETag {etag or 'missing'}, "
                f"sent MD5 {body.md5.hexdigest()})"
            )
        return StoredObject(key, body.size, body.sha256.hexdigest())


def grant_http_pool() -> urllib3.PoolManager:
    """The HTTP pool of every attempt's storage grant (a daemon holds no S3 key). It fails
    within seconds and lets the executor's upload retries (with backoff) decide."""
    return urllib3.PoolManager(
        maxsize=16,
        timeout=urllib3.Timeout(connect=5.0, read=120.0),
        retries=urllib3.Retry(total=2, backoff_factor=0.5),
    )
