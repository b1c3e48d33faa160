"""Async object store over the MinIO SDK: put/get/stat/list/presign in one bucket."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, TypeVar

import urllib3
from minio import Minio
from minio.datatypes import Part, PostPolicy
from minio.error import S3Error

# S3 error codes that mean "no such object" (NoSuchKey on GET, NotFound on HEAD).
T = TypeVar("T")

_MISSING = frozenset({"NoSuchKey", "NotFound", "NoSuchObject"})
# S3 error codes of a multipart completion the client got wrong.
_REFUSED_PARTS = frozenset({"InvalidPart", "InvalidPartOrder", "NoSuchUpload", "EntityTooSmall"})


class StorageError(Exception):
    """An object store operation failed; the message says which and why."""


class ObjectNotFound(StorageError):
    """The object does not exist in the bucket."""


class PartsRefused(StorageError):
    """A multipart upload could not be completed from the parts named (unknown upload,
    missing or wrong ETags, parts too small)."""


@dataclass(frozen=True)
class StoredObject:
    """An object just written: its key, size and the SHA-256 of the bytes sent."""

    key: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    """What the server says about a stored object."""

    key: str
    size_bytes: int
    etag: str
    last_modified: datetime | None


class _HashingReader(io.RawIOBase):
    """Wraps a binary file; hashes the bytes as the SDK reads them (one pass, no re-read)."""

    def __init__(self, handle: BinaryIO) -> None:
        super().__init__()
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._handle.read(-1 if size is None else size)
        self.digest.update(data)
        self.size += len(data)
        return data


class ObjectStore:
    """One bucket of an S3 server. Blocking SDK calls run in worker threads.

    `region` is given to the SDK so that presigning needs no network round trip.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        bucket: str,
        secure: bool = False,
        region: str = "us-east-1",
        http_client: urllib3.PoolManager | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.region = region
        self.secure = secure
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http_client,
        )

    @classmethod
    def _sharing(cls, other: ObjectStore, bucket: str) -> ObjectStore:
        store = cls.__new__(cls)
        store.endpoint, store.bucket, store.region = other.endpoint, bucket, other.region
        store.secure = other.secure
        store._client = other._client
        return store

    def for_bucket(self, bucket: str) -> ObjectStore:
        """The same server and credentials, another bucket (shares the connection pool)."""
        return self if bucket == self.bucket else ObjectStore._sharing(self, bucket)

    async def ensure_bucket(self) -> None:
        """Creates the bucket unless it exists."""

        def ensure() -> None:
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        await self._call("", ensure)

    async def put_file(self, key: str, path: Path) -> StoredObject:
        """Uploads a local file, hashing it while it streams."""

        def put() -> StoredObject:
            with path.open("rb") as handle:
                length = path.stat().st_size
                reader = _HashingReader(handle)
                self._client.put_object(self.bucket, key, reader, length)  # type: ignore[arg-type]
            return StoredObject(key, reader.size, reader.digest.hexdigest())

        return await self._call(key, put)

    async def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        def put() -> StoredObject:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
            return StoredObject(key, len(data), hashlib.sha256(data).hexdigest())

        return await self._call(key, put)

    async def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return await self._call(key, get)

    async def digest(self, key: str) -> tuple[int, str]:
        """(size, SHA-256 hex) of the stored object's bytes, read back in a stream."""

        def read() -> tuple[int, str]:
            response = self._client.get_object(self.bucket, key)
            digest, size = hashlib.sha256(), 0
            try:
                for chunk in response.stream(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
            finally:
                response.close()
                response.release_conn()
            return size, digest.hexdigest()

        return await self._call(key, read)

    async def stat(self, key: str) -> ObjectInfo:
        def stat() -> ObjectInfo:
            info = self._client.stat_object(self.bucket, key)
            return ObjectInfo(key, int(info.size or 0), str(info.etag or ""), info.last_modified)

        return await self._call(key, stat)

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except ObjectNotFound:
            return False
        return True

    async def presign_get(self, key: str, ttl_seconds: int) -> str:
        """A URL that GETs the object without credentials until it expires."""
        return await self._presign("GET", key, ttl_seconds)

    async def presign_put(self, key: str, ttl_seconds: int) -> str:
        """A URL that PUTs the object (one request, up to 5 GiB) without credentials until it
        expires."""
        return await self._presign("PUT", key, ttl_seconds)

    async def _presign(
        self,
        method: str,
        key: str,
        ttl_seconds: int,
        query: dict[str, str | list[str] | tuple[str]] | None = None,
    ) -> str:
        try:
            return await asyncio.to_thread(
                self._client.get_presigned_url,
                method,
                self.bucket,
                key,
                expires=timedelta(seconds=ttl_seconds),
                extra_query_params=query,
            )
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            # Presigning needs no round trip (the region is given) unless the SDK must ask.
            raise StorageError(str(exc)) from exc

    def sign_get(self, key: str, ttl_seconds: int) -> str:
        """`presign_get` without a thread: the SDK signs locally since the region is given
        (for a caller that builds many URLs at once, as the scheduler does per dispatch)."""
        return self._client.get_presigned_url(
            "GET", self.bucket, key, expires=timedelta(seconds=ttl_seconds)
        )

    def sign_post(
        self, prefix: str, expires_at: datetime, max_bytes: int
    ) -> tuple[str, dict[str, str]]:
        """A presigned POST policy: (bucket URL, form fields) that store any key starting
        with `prefix`, of at most `max_bytes`, with any Content-Type, until `expires_at`.
        The S3 server checks every condition; the holder can do nothing else with it."""
        policy = PostPolicy(self.bucket, expires_at)
        policy.add_starts_with_condition("key", prefix)
        policy.add_starts_with_condition("Content-Type", "")
        policy.add_content_length_range_condition(0, max_bytes)
        fields = self._client.presigned_post_policy(policy)
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{self.endpoint}/{self.bucket}", dict(fields)

    async def start_multipart(self, key: str) -> str:
        """Starts a multipart upload of `key`; returns its upload id."""
        # The SDK's multipart calls are internal to its put_object; they are what S3 offers.
        return await self._call(
            key, lambda: self._client._create_multipart_upload(self.bucket, key, {})
        )

    async def presign_part(self, key: str, upload_id: str, number: int, ttl_seconds: int) -> str:
        """A URL that PUTs part `number` (from 1) of a multipart upload without credentials."""
        query: dict[str, str | list[str] | tuple[str]] = {
            "uploadId": upload_id,
            "partNumber": str(number),
        }
        return await self._presign("PUT", key, ttl_seconds, query)

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[tuple[int, str]]
    ) -> None:
        """Joins the uploaded parts, (number, ETag) in order, into the object."""
        listed = [Part(number, etag) for number, etag in parts]
        await self._call(
            key,
            lambda: self._client._complete_multipart_upload(self.bucket, key, upload_id, listed),
        )

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drops a multipart upload and its parts; one already gone is not an error."""
        try:
            await self._call(
                key, lambda: self._client._abort_multipart_upload(self.bucket, key, upload_id)
            )
        except (ObjectNotFound, PartsRefused):
            return

    async def delete(self, key: str) -> None:
        """Removes the object; removing one that does not exist is not an error (S3)."""
        await self._call(key, lambda: self._client.remove_object(self.bucket, key))

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under `prefix` (recursively), in key order."""

        def listing() -> list[ObjectInfo]:
            found = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return [
                ObjectInfo(str(o.object_name), int(o.size or 0), str(o.etag or ""), o.last_modified)
                for o in found
                if not o.is_dir
            ]

        return await self._call(prefix, listing)

    async def download_file(self, key: str, path: Path) -> StoredObject:
        """Writes the object to `path` (via a temporary file beside it), hashing it in the
        same pass; returns its size and SHA-256."""

        def download() -> StoredObject:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.part")
            response = self._client.get_object(self.bucket, key)
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
            finally:
                response.close()
                response.release_conn()
            partial.replace(path)
            return StoredObject(key, size, digest.hexdigest())

        return await self._call(key, download)

    async def _call(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except S3Error as exc:
            if exc.code in _MISSING:
                raise ObjectNotFound(f"object '{key}' not found in bucket '{self.bucket}'") from exc
            if exc.code in _REFUSED_PARTS:
                raise PartsRefused(f"{exc.code}: {exc.message}") from exc
            where = f"bucket '{self.bucket}', '{key}'"
            raise StorageError(f"{where}: {exc.code}: {exc.message}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise StorageError(f"S3 endpoint {self.endpoint} unreachable: {exc}") from exc
