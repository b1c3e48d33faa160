"""Input data of a consumer: presigned uploads, records with their SHA-256, listing, deletion."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuplane.v1 import types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.data.models import InputRecord
from controlplane.data.repository import InputRepository
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from controlplane.paging import Page, PageRequest
from storage.layout import input_key
from storage.objects import ObjectNotFound, ObjectStore, PartsRefused

# S3's limits: one PUT (or one part) carries at most 5 GiB; a multipart upload has parts of
# at least 5 MiB (but the last), at most 5 TiB in all. Ours: at most 1,000 parts (S3 allows
# 10,000), so that the URLs of all parts fit in one reply of well under a MiB.
MAX_SINGLE_PUT_BYTES = 5 * 1024**3
MIN_PART_BYTES = 5 * 1024**2
MAX_PARTS = 1_000
MAX_OBJECT_BYTES = 5 * 1024**4
# S3 keys are at most 1024 bytes; inputs/<tenant id>/ takes the rest.
MAX_KEY_BYTES = 900
DEFAULT_URL_TTL = 3600
MAX_URL_TTL = 7 * 24 * 3600
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Upload:
    """One PUT to `url`, or (`upload_id` set) one PUT per part to `part_urls`."""

    key: str
    url: str
    expires_at: datetime
    max_size_bytes: int = MAX_SINGLE_PUT_BYTES
    upload_id: str = ""
    part_urls: tuple[str, ...] = ()
    part_size_bytes: int = 0


def part_count(size_bytes: int, part_size_bytes: int) -> int:
    """How many parts a multipart upload of `size_bytes` takes; checks S3's limits."""
    if not MIN_PART_BYTES <= part_size_bytes <= MAX_SINGLE_PUT_BYTES:
        raise InvalidArgument("part_size_bytes", "must be between 5 MiB and 5 GiB")
    if not 0 < size_bytes <= MAX_OBJECT_BYTES:
        raise InvalidArgument("size_bytes", "a multipart upload needs a size, at most 5 TiB")
    count = -(-size_bytes // part_size_bytes)
    if count > MAX_PARTS:
        raise InvalidArgument("part_size_bytes", f"{count} parts: at most {MAX_PARTS}")
    return count


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _checked_upload_id(upload_id: str) -> str:
    if not upload_id or len(upload_id) > 1024 or _has_control(upload_id):
        raise InvalidArgument("upload_id", "is not an upload id CreateUpload returned")
    return upload_id


def key_problem(key: str) -> str | None:
    """What is wrong with an input key, None when it is a clean relative object key."""
    if not key:
        return "is required"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"at most {MAX_KEY_BYTES} bytes"
    if _has_control(key):
        return "must not contain NUL or control characters"
    if key.startswith("/") or key.endswith("/"):
        return "must be relative and name an object (no leading or trailing '/')"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "must not contain empty, '.' or '..' segments"
    return None


def checked_key(key: str, field: str = "key") -> str:
    problem = key_problem(key)
    if problem is not None:
        raise InvalidArgument(field, problem)
    return key


def checked_sha256(value: str, field: str = "sha256") -> str:
    """A hex SHA-256 in lower case, or "" (none given)."""
    value = value.lower()
    if value and not SHA256_HEX.fullmatch(value):
        raise InvalidArgument(field, "must be 64 hexadecimal digits (a SHA-256)")
    return value


async def stamp_input_hashes(
    session: AsyncSession, tenant_id: str, spec: types_pb2.JobSpec
) -> types_pb2.JobSpec:
    """The spec with each input that names no sha256 carrying the one recorded for its key
    (inputs nobody uploaded through DataService stay unchecked)."""
    unstamped = {item.key for item in spec.inputs if not item.sha256}
    hashes = await InputRepository(session).hashes(tenant_id, unstamped)
    if not hashes:
        return spec
    stamped = types_pb2.JobSpec()
    stamped.CopyFrom(spec)
    for item in stamped.inputs:
        if not item.sha256 and item.key in hashes:
            item.sha256 = hashes[item.key]
    return stamped


class DataService:
    """The caller's own input area, inputs/<tenant>/: nothing here can name another's."""

    def __init__(self, db: Database, store: ObjectStore) -> None:
        self.db = db
        self.store = store

    async def create_upload(
        self, caller: Principal, key: str, size_bytes: int, ttl_seconds: int, part_size: int = 0
    ) -> Upload:
        """Presigned PUT URLs for `key` in the caller's input area: one, or with `part_size`
        one per part of a multipart upload."""
        checked_key(key)
        ttl = ttl_seconds or DEFAULT_URL_TTL
        if ttl > MAX_URL_TTL:
            raise InvalidArgument("url_ttl_seconds", "at most 7 days (604800)")
        expires = utcnow() + timedelta(seconds=ttl)
        stored = input_key(caller.tenant_id, key)
        if not part_size:
            if size_bytes > MAX_SINGLE_PUT_BYTES:
                raise InvalidArgument(
                    "size_bytes", "at most 5 GiB in one PUT: give part_size_bytes for multipart"
                )
            return Upload(key, await self.store.presign_put(stored, ttl), expires)
        count = part_count(size_bytes, part_size)
        upload_id = await self.store.start_multipart(stored)
        urls = [
            await self.store.presign_part(stored, upload_id, n, ttl) for n in range(1, count + 1)
        ]
        return Upload(key, "", expires, part_size, upload_id, tuple(urls), part_size)

    async def complete_upload(
        self,
        caller: Principal,
        key: str,
        sha256: str,
        upload_id: str = "",
        parts: list[tuple[int, str]] | None = None,
    ) -> InputRecord:
        """Joins a multipart upload's `parts` (with `upload_id`), reads the object back and
        records its size and SHA-256. With `sha256` given, bytes that hash otherwise are
        refused and deleted."""
        checked_key(key)
        expected = checked_sha256(sha256)
        stored = input_key(caller.tenant_id, key)
        if upload_id:
            await self._join(stored, upload_id, parts or [])
        try:
            size, actual = await self.store.digest(stored)
        except ObjectNotFound:
            raise NotFound(f"key: nothing was uploaded to '{key}'") from None
        if expected and actual != expected:
            await self.store.delete(stored)
            raise FailedPrecondition(
                f"sha256: the uploaded bytes hash to {actual}, not {expected}; "
                "the object was deleted, upload it again"
            )

        async def work(session: AsyncSession) -> InputRecord:
            return await InputRepository(session).record(
                caller.tenant_id, key, size, actual, utcnow()
            )

        return await self.db.run(work)

    async def abort_upload(self, caller: Principal, key: str, upload_id: str) -> None:
        """Drops a multipart upload of `key` in the caller's area, with its parts."""
        checked_key(key)
        await self.store.abort_multipart(
            input_key(caller.tenant_id, key), _checked_upload_id(upload_id)
        )

    async def _join(self, stored: str, upload_id: str, parts: list[tuple[int, str]]) -> None:
        _checked_upload_id(upload_id)
        if any(len(etag) > 200 or _has_control(etag) for _, etag in parts):
            raise InvalidArgument("parts", "an ETag is not one storage returned")
        numbers = [number for number, _ in parts]
        if not parts or numbers != list(range(1, len(parts) + 1)):
            raise InvalidArgument("parts", "every part, numbered from 1 in order, with its ETag")
        try:
            await self.store.complete_multipart(stored, upload_id, parts)
        except PartsRefused as exc:
            raise FailedPrecondition(f"parts: the upload could not be completed: {exc}") from exc

    async def list(self, caller: Principal, prefix: str, page: PageRequest) -> Page[InputRecord]:
        if len(prefix.encode()) > MAX_KEY_BYTES:
            raise InvalidArgument("prefix", f"at most {MAX_KEY_BYTES} bytes")
        if _has_control(prefix):
            raise InvalidArgument("prefix", "must not contain NUL or control characters")
        async with self.db.read() as session:
            return await InputRepository(session).list(caller.tenant_id, prefix, page)

    async def delete(self, caller: Principal, key: str) -> None:
        """Deletes the object and its record; NOT_FOUND when neither exists."""
        checked_key(key)
        stored = input_key(caller.tenant_id, key)
        existed = await self.store.exists(stored)
        if existed:
            await self.store.delete(stored)

        async def work(session: AsyncSession) -> bool:
            return await InputRepository(session).forget(caller.tenant_id, key)

        if not await self.db.run(work) and not existed:
            raise NotFound(f"key: no input '{key}'")
