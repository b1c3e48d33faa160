"""What one attempt may do in the bucket: GET its inputs, POST under its own prefix."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import messaging_pb2, types_pb2

from storage.layout import attempt_prefix, input_key
from storage.objects import ObjectStore

# How long after the attempt's deadline its outputs may still be stored: the daemon's upload
# retries with backoff (5 tries, at most 30 s apart) and the transfer of up to 10 GiB.
UPLOAD_WINDOW = timedelta(hours=1)
# S3 stores at most 5 GiB in one POST (there is no multipart form of a POST).
MAX_OBJECT_BYTES = 5 << 30
# SigV4 presigned URLs last at most 7 days.
_MAX_URL_TTL = timedelta(days=7)


def attempt_grant(
    store: ObjectStore,
    *,
    tenant_id: str,
    job_id: str,
    attempt: int,
    inputs: Iterable[types_pb2.JobInput],
    deadline: datetime,
    now: datetime,
) -> messaging_pb2.StorageGrant:
    """The grant of one attempt, signed with the control plane's key (locally, no round trip).

    Inputs are read before the container starts, so their URLs last until the attempt's
    deadline (capped at 7 days); the POST policy lasts until the deadline plus
    `UPLOAD_WINDOW`, the time its outputs may take to store after the container is stopped.
    """
    expires_at = deadline + UPLOAD_WINDOW
    get_ttl = int(min(deadline - now, _MAX_URL_TTL).total_seconds())
    input_urls = {
        key: store.sign_get(key, max(get_ttl, 1))
        for key in {input_key(tenant_id, item.key) for item in inputs}
    }
    url, fields = store.sign_post(attempt_prefix(job_id, attempt), expires_at, MAX_OBJECT_BYTES)
    expires = Timestamp()
    expires.FromDatetime(expires_at)
    return messaging_pb2.StorageGrant(
        input_urls=input_urls,
        upload_url=url,
        upload_fields=fields,
        max_object_bytes=MAX_OBJECT_BYTES,
        expires_at=expires,
    )
