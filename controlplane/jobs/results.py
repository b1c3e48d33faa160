"""A job's stored results: the objects of one attempt's manifest, presigned for download."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from controlplane.auth.principal import Principal
from controlplane.db.base import utcnow
from controlplane.errors import InvalidArgument, NotFound
from controlplane.jobs.models import JobAttempt
from controlplane.jobs.service import JobService
from storage.layout import attempt_prefix, inside
from storage.objects import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_URL_TTL = 3600
MAX_URL_TTL = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class ResultObject:
    key: str
    path: str
    size_bytes: int
    sha256: str
    url: str


@dataclass(frozen=True, slots=True)
class Results:
    job_id: str
    attempt: int
    objects: list[ResultObject]
    urls_expire_at: datetime
    # The attempt's countersigned provenance document (JSON), "" without one.
    provenance: str = ""
    control_plane_public_key: bytes = b""


def url_ttl(requested_seconds: int) -> int:
    """How long the URLs last: the request's time (0 for an hour), at most 7 days."""
    ttl = requested_seconds or DEFAULT_URL_TTL
    if ttl > MAX_URL_TTL:
        raise InvalidArgument("url_ttl_seconds", "at most 7 days (604800)")
    return ttl


def _safe_entries(job_id: str, attempt: JobAttempt) -> list[dict[str, Any]]:
    """The manifest comes from the provider's daemon: only what lies under this attempt's own
    prefix is presigned, never a key naming another job's (or tenant's) objects."""
    prefix = attempt_prefix(job_id, attempt.attempt)
    entries = [e for e in attempt.manifest if inside(str(e.get("key", "")), prefix)]
    if len(entries) < len(attempt.manifest):
        log.warning(
            "job %s attempt %d: %d result keys outside %s not presigned",
            job_id,
            attempt.attempt,
            len(attempt.manifest) - len(entries),
            prefix,
        )
    return entries


class JobResults:
    def __init__(self, jobs: JobService, store: ObjectStore) -> None:
        self.jobs = jobs
        self.store = store

    async def presigned(
        self, caller: Principal, job_id: str, attempt: int, ttl_seconds: int
    ) -> Results:
        """The stored objects of `attempt` (0: the latest attempt that stored any), each with
        a URL that downloads it without credentials for `ttl_seconds`."""
        view = await self.jobs.get(caller, job_id)
        candidates = [a for a in view.attempts if a.manifest]
        if attempt:
            candidates = [a for a in candidates if a.attempt == attempt]
        if not candidates:
            raise NotFound(
                f"job_id: job {job_id} has no stored results yet (state {view.job.state})"
            )
        chosen = candidates[-1]
        objects = []
        for entry in _safe_entries(job_id, chosen):
            objects.append(
                ResultObject(
                    key=entry["key"],
                    path=entry["path"],
                    size_bytes=int(entry["size_bytes"]),
                    sha256=entry["sha256"],
                    url=await self.store.presign_get(entry["key"], ttl_seconds),
                )
            )
        expires = utcnow() + timedelta(seconds=ttl_seconds)
        key = self.jobs.provenance_key
        return Results(
            job_id,
            chosen.attempt,
            objects,
            expires,
            provenance=chosen.provenance or "",
            control_plane_public_key=b"" if key is None else key.public_bytes,
        )
