"""Storage grants against the real S3 server: what a grant allows works (large files streamed
in one POST, inputs fetched and hashed), a file over its size limit is refused before any
transfer, and an expired grant is refused by the server."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from pathlib import Path

import pytest
import urllib3
from gpuplane.v1 import types_pb2

from controlplane.db.base import utcnow
from storage import layout
from storage.grants import UPLOAD_WINDOW, attempt_grant
from storage.objects import ObjectNotFound, ObjectStore, StorageError
from storage.scoped import GrantedStore
from storage.upload import OutputTooLarge, upload_attempt

pytestmark = pytest.mark.timeout(60)


def granted(store: ObjectStore, inputs: list[str], *, deadline_in: timedelta) -> GrantedStore:
    now = utcnow()
    grant = attempt_grant(
        store,
        tenant_id="t1",
        job_id="job-1",
        attempt=1,
        inputs=[types_pb2.JobInput(key=key) for key in inputs],
        deadline=now + deadline_in,
        now=now,
    )
    return GrantedStore(grant, urllib3.PoolManager(retries=False))


async def test_a_large_output_is_streamed_in_one_post_and_inputs_are_fetched(
    store: ObjectStore, tmp_path: Path
) -> None:
    data = os.urandom(12 << 20)  # over the SDK's 5 MiB multipart threshold
    await store.put_bytes(layout.input_key("t1", "in.bin"), data)
    scoped = granted(store, ["in.bin", "missing.bin"], deadline_in=timedelta(minutes=10))
    fetched = await scoped.download_file(layout.input_key("t1", "in.bin"), tmp_path / "in.bin")
    assert fetched.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(ObjectNotFound):
        await scoped.download_file(layout.input_key("t1", "missing.bin"), tmp_path / "m")
    assert not (tmp_path / "m").exists()

    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "big.bin").write_bytes(data)
    log = tmp_path / "stdout.log"
    log.write_bytes(b"hello\n")
    manifest = await upload_attempt(scoped, "job-1", 1, tmp_path / "output", {"stdout": log})
    assert [(m.path, m.size_bytes) for m in manifest] == [
        ("output/big.bin", len(data)),
        ("logs/stdout", 6),
    ]
    assert await store.digest(layout.output_key("job-1", 1, "big.bin")) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
    )
    assert await store.exists(layout.manifest_key("job-1", 1))


async def test_a_file_over_the_grants_limit_is_refused_before_any_transfer(
    store: ObjectStore, tmp_path: Path
) -> None:
    scoped = granted(store, [], deadline_in=timedelta(minutes=10))
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "small.bin").write_bytes(b"x" * 10)
    (tmp_path / "output" / "large.bin").write_bytes(b"x" * 1001)
    with pytest.raises(OutputTooLarge, match="/output/large.bin holds 1001 bytes"):
        await upload_attempt(scoped, "job-1", 1, tmp_path / "output", {}, max_object_bytes=1000)
    assert await store.list("jobs/") == []


async def test_an_expired_grant_is_refused_by_the_server(
    store: ObjectStore, tmp_path: Path
) -> None:
    await store.put_bytes(layout.input_key("t1", "in.bin"), b"input")
    # The attempt's deadline passed longer ago than the upload window: nothing works.
    scoped = granted(store, ["in.bin"], deadline_in=-(UPLOAD_WINDOW + timedelta(minutes=1)))
    with pytest.raises(StorageError, match="AccessDenied|expired|Expired"):
        await scoped.put_bytes(layout.output_key("job-1", 1, "late.txt"), b"late")
    assert not await store.exists(layout.output_key("job-1", 1, "late.txt"))
