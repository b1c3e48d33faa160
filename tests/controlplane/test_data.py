"""DataService against real S3: presigned uploads into the caller's own input area, the
SHA-256 recorded on completion and carried by jobs, listing, deletion, scoping, bad keys."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request

import grpc
import pytest
from gpuplane.v1 import data_pb2, data_pb2_grpc, types_pb2

from devstack.factories import new_tenant
from tests.harness import JobPlane

pytestmark = pytest.mark.databases("sqlite", "postgresql")


def _put(url: str, data: bytes) -> int:
    request = urllib.request.Request(url, data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


class Data:
    """One tenant's view of DataService."""

    def __init__(self, plane: JobPlane, key: str) -> None:
        self.stub = data_pb2_grpc.DataServiceStub(plane.channel)
        self.metadata = plane.auth(key)

    async def upload(self, key: str, data: bytes, sha256: str = "") -> data_pb2.InputObject:
        upload = await self.stub.CreateUpload(
            data_pb2.CreateUploadRequest(key=key, size_bytes=len(data)), metadata=self.metadata
        )
        assert await asyncio.to_thread(_put, upload.url, data) == 200
        done = await self.stub.CompleteUpload(
            data_pb2.CompleteUploadRequest(key=key, sha256=sha256), metadata=self.metadata
        )
        return done.input

    async def keys(self, prefix: str = "", page_size: int = 0) -> list[str]:
        keys: list[str] = []
        token = ""
        while True:
            page = await self.stub.ListInputs(
                data_pb2.ListInputsRequest(prefix=prefix, page_size=page_size, page_token=token),
                metadata=self.metadata,
            )
            keys += [item.key for item in page.inputs]
            token = page.next_page_token
            if not token:
                return keys


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code(), caught.value.details() or ""


async def test_upload_records_hash_lists_and_deletes(plane: JobPlane) -> None:
    data = Data(plane, plane.consumer_key)
    payload = b"gpuplane input " * 1000
    recorded = await data.upload("sets/train.bin", payload, hashlib.sha256(payload).hexdigest())
    assert recorded.key == "sets/train.bin"
    assert recorded.size_bytes == len(payload)
    assert recorded.sha256 == hashlib.sha256(payload).hexdigest()
    stored = f"inputs/{plane.consumer_tenant}/sets/train.bin"
    assert await plane.plane.store.get_bytes(stored) == payload
    # Without a client hash the read-back is what is recorded.
    await data.upload("sets/val.bin", b"v")
    await data.upload("other.txt", b"o")
    assert await data.keys() == ["other.txt", "sets/train.bin", "sets/val.bin"]
    assert await data.keys(page_size=1) == ["other.txt", "sets/train.bin", "sets/val.bin"]
    assert await data.keys(prefix="sets/") == ["sets/train.bin", "sets/val.bin"]
    # Uploading again to a key replaces its record.
    again = await data.upload("sets/val.bin", b"v2")
    assert again.sha256 == hashlib.sha256(b"v2").hexdigest()
    await data.stub.DeleteInput(
        data_pb2.DeleteInputRequest(key="sets/train.bin"), metadata=data.metadata
    )
    assert not await plane.plane.store.exists(stored)
    assert await data.keys() == ["other.txt", "sets/val.bin"]
    code, details = await _code(
        data.stub.DeleteInput(
            data_pb2.DeleteInputRequest(key="sets/train.bin"), metadata=data.metadata
        )
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.NOT_FOUND, "key")


async def test_a_tenant_touches_only_its_own_input_area(plane: JobPlane) -> None:
    mine = Data(plane, plane.consumer_key)
    _, other_key = await new_tenant(plane, "other", types_pb2.ROLE_CONSUMER)
    theirs = Data(plane, other_key)
    await mine.upload("shared-name.bin", b"mine")
    assert await theirs.keys() == []
    code, _ = await _code(
        theirs.stub.DeleteInput(
            data_pb2.DeleteInputRequest(key="shared-name.bin"), metadata=theirs.metadata
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # Completing a key only the other tenant uploaded finds nothing in one's own area.
    code, _ = await _code(
        theirs.stub.CompleteUpload(
            data_pb2.CompleteUploadRequest(key="shared-name.bin"), metadata=theirs.metadata
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    await theirs.upload("shared-name.bin", b"theirs")
    store = plane.plane.store
    assert await store.get_bytes(f"inputs/{plane.consumer_tenant}/shared-name.bin") == b"mine"
    assert await mine.keys() == ["shared-name.bin"]
    # A provider has no input area.
    _, provider_key = await new_tenant(plane, "prov", types_pb2.ROLE_PROVIDER)
    provider = Data(plane, provider_key)
    code, _ = await _code(
        provider.stub.ListInputs(data_pb2.ListInputsRequest(), metadata=provider.metadata)
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    "key",
    ["", "../escape", "a/../../b", "/abs", "a//b", "dir/", "./a", "a\x00b", "a\nb", "k" * 901],
)
async def test_bad_keys_are_invalid_argument_naming_key(plane: JobPlane, key: str) -> None:
    data = Data(plane, plane.consumer_key)
    calls = [
        data.stub.CreateUpload(data_pb2.CreateUploadRequest(key=key), metadata=data.metadata),
        data.stub.CompleteUpload(data_pb2.CompleteUploadRequest(key=key), metadata=data.metadata),
        data.stub.DeleteInput(data_pb2.DeleteInputRequest(key=key), metadata=data.metadata),
    ]
    for call in calls:
        code, details = await _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (key, details)
        assert details.startswith("key:"), details
    assert await plane.plane.store.list(f"inputs/{plane.consumer_tenant}/") == []


async def test_bad_sizes_hashes_and_missing_uploads(plane: JobPlane) -> None:
    data = Data(plane, plane.consumer_key)
    code, details = await _code(
        data.stub.CreateUpload(
            data_pb2.CreateUploadRequest(key="big", size_bytes=6 * 1024**3), metadata=data.metadata
        )
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "size_bytes")
    code, details = await _code(
        data.stub.CompleteUpload(
            data_pb2.CompleteUploadRequest(key="x", sha256="beef"), metadata=data.metadata
        )
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "sha256")
    code, details = await _code(
        data.stub.CompleteUpload(
            data_pb2.CompleteUploadRequest(key="never"), metadata=data.metadata
        )
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.NOT_FOUND, "key")
    code, details = await _code(
        data.stub.ListInputs(data_pb2.ListInputsRequest(prefix="a\x00"), metadata=data.metadata)
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "prefix")
    # Bytes that do not hash as the client said are refused, deleted and never recorded.
    wrong = hashlib.sha256(b"something else").hexdigest()
    code, details = await _code(data.upload("mangled.bin", b"payload", sha256=wrong))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.FAILED_PRECONDITION, "sha256")
    assert not await plane.plane.store.exists(f"inputs/{plane.consumer_tenant}/mangled.bin")
    assert await data.keys() == []


async def test_submit_stamps_recorded_hashes_on_inputs(plane: JobPlane) -> None:
    data = Data(plane, plane.consumer_key)
    recorded = await data.upload("in/weights.bin", b"weights")
    given = hashlib.sha256(b"the user's own").hexdigest()
    job = await plane.submit(
        inputs=[
            types_pb2.JobInput(key="in/weights.bin"),
            types_pb2.JobInput(key="in/weights.bin", path="copy.bin", sha256=given),
            types_pb2.JobInput(key="unrecorded.bin"),
        ]
    )
    hashes = [item.sha256 for item in (await plane.get(job.job_id)).spec.inputs]
    assert hashes == [recorded.sha256, given, ""]
    code, details = await _code(
        plane.submit(inputs=[types_pb2.JobInput(key="in/weights.bin", sha256="XYZ")])
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("spec.inputs[0].sha256"), details


def _put_part(url: str, data: bytes) -> str:
    request = urllib.request.Request(url, data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(response.headers["ETag"])


async def test_multipart_upload_in_parts(plane: JobPlane) -> None:
    data = Data(plane, plane.consumer_key)
    part = 5 * 1024 * 1024
    payload = os.urandom(2 * part + 1234)
    created = await data.stub.CreateUpload(
        data_pb2.CreateUploadRequest(key="big.bin", size_bytes=len(payload), part_size_bytes=part),
        metadata=data.metadata,
    )
    assert created.url == ""
    assert created.upload_id
    assert len(created.part_urls) == 3
    chunks = [payload[i : i + part] for i in range(0, len(payload), part)]
    pairs = zip(created.part_urls, chunks, strict=True)
    etags = [await asyncio.to_thread(_put_part, url, chunk) for url, chunk in pairs]
    parts = [data_pb2.UploadedPart(part_number=n, etag=e) for n, e in enumerate(etags, start=1)]
    # Parts missing or out of order are the client's mistake, named.
    code, details = await _code(
        data.stub.CompleteUpload(
            data_pb2.CompleteUploadRequest(
                key="big.bin", upload_id=created.upload_id, parts=parts[1:]
            ),
            metadata=data.metadata,
        )
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "parts")
    wrong = [data_pb2.UploadedPart(part_number=1, etag='"0000"'), *parts[1:]]
    code, details = await _code(
        data.stub.CompleteUpload(
            data_pb2.CompleteUploadRequest(key="big.bin", upload_id=created.upload_id, parts=wrong),
            metadata=data.metadata,
        )
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.FAILED_PRECONDITION, "parts")
    done = await data.stub.CompleteUpload(
        data_pb2.CompleteUploadRequest(
            key="big.bin",
            sha256=hashlib.sha256(payload).hexdigest(),
            upload_id=created.upload_id,
            parts=parts,
        ),
        metadata=data.metadata,
    )
    assert done.input.size_bytes == len(payload)
    assert done.input.sha256 == hashlib.sha256(payload).hexdigest()
    stored = f"inputs/{plane.consumer_tenant}/big.bin"
    assert await plane.plane.store.get_bytes(stored) == payload


async def test_an_aborted_multipart_upload_cannot_be_completed(plane: JobPlane) -> None:
    data = Data(plane, plane.consumer_key)
    part = 5 * 1024 * 1024
    created = await data.stub.CreateUpload(
        data_pb2.CreateUploadRequest(key="dropped.bin", size_bytes=part, part_size_bytes=part),
        metadata=data.metadata,
    )
    etag = await asyncio.to_thread(_put_part, created.part_urls[0], os.urandom(part))
    abort = data_pb2.AbortUploadRequest(key="dropped.bin", upload_id=created.upload_id)
    await data.stub.AbortUpload(abort, metadata=data.metadata)
    await data.stub.AbortUpload(abort, metadata=data.metadata)  # idempotent
    complete = data_pb2.CompleteUploadRequest(
        key="dropped.bin",
        upload_id=created.upload_id,
        parts=[data_pb2.UploadedPart(part_number=1, etag=etag)],
    )
    code, details = await _code(data.stub.CompleteUpload(complete, metadata=data.metadata))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.FAILED_PRECONDITION, "parts")
    assert await data.keys() == []
    code, details = await _code(
        data.stub.AbortUpload(
            data_pb2.AbortUploadRequest(key="dropped.bin"), metadata=data.metadata
        )
    )
    assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, "upload_id")


@pytest.mark.parametrize(
    ("size", "part", "field"),
    [
        (100, 1024, "part_size_bytes"),  # parts under 5 MiB
        (10 * 1024**3, 6 * 1024**3, "part_size_bytes"),  # parts over 5 GiB
        (0, 5 * 1024**2, "size_bytes"),  # multipart needs the size
        (6 * 1024**4, 1024**3, "size_bytes"),  # over 5 TiB
        (1_001 * 5 * 1024**2, 5 * 1024**2, "part_size_bytes"),  # over 1,000 parts
    ],
)
async def test_bad_multipart_sizes(plane: JobPlane, size: int, part: int, field: str) -> None:
    data = Data(plane, plane.consumer_key)
    request = data_pb2.CreateUploadRequest(key="k", size_bytes=size, part_size_bytes=part)
    code, details = await _code(data.stub.CreateUpload(request, metadata=data.metadata))
    assert (code, details.split(":")[0]) == (grpc.StatusCode.INVALID_ARGUMENT, field)
