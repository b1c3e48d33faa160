"""ObjectStore against a real S3 server: roundtrips, hashes, presigned URLs, listing."""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import pytest

from storage.objects import ObjectNotFound, ObjectStore


async def test_put_bytes_get_bytes_roundtrip(store: ObjectStore) -> None:
    stored = await store.put_bytes("a/b.txt", b"hello world")
    assert stored.size_bytes == 11
    assert stored.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert await store.get_bytes("a/b.txt") == b"hello world"
    info = await store.stat("a/b.txt")
    assert info.size_bytes == 11


async def test_put_file_hashes_while_streaming_multipart(
    store: ObjectStore, tmp_path: Path
) -> None:
    # Over the SDK's 5 MiB part size: a multipart upload of two parts, hashed in one pass.
    data = os.urandom(6 * 1024 * 1024 + 123)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    stored = await store.put_file("big.bin", path)
    assert stored.size_bytes == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await store.get_bytes("big.bin") == data


async def test_presigned_url_serves_the_bytes_without_credentials(store: ObjectStore) -> None:
    await store.put_bytes("p/x.bin", b"\x00\x01presigned")
    url = await store.presign_get("p/x.bin", 60)
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x00\x01presigned"


async def test_missing_object_is_object_not_found(store: ObjectStore, tmp_path: Path) -> None:
    assert not await store.exists("nope")
    with pytest.raises(ObjectNotFound, match="'nope' not found"):
        await store.get_bytes("nope")
    with pytest.raises(ObjectNotFound):
        await store.download_file("nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    assert not list(tmp_path.iterdir())


async def test_list_and_download(store: ObjectStore, tmp_path: Path) -> None:
    await store.put_bytes("dir/one", b"1")
    await store.put_bytes("dir/sub/two", b"22")
    await store.put_bytes("other", b"333")
    listed = await store.list("dir/")
    assert [(o.key, o.size_bytes) for o in listed] == [("dir/one", 1), ("dir/sub/two", 2)]
    fetched = await store.download_file("dir/sub/two", tmp_path / "deep" / "two")
    assert (fetched.size_bytes, fetched.sha256) == (2, hashlib.sha256(b"22").hexdigest())
    assert (tmp_path / "deep" / "two").read_bytes() == b"22"


async def test_for_bucket_shares_the_server(store: ObjectStore) -> None:
    other = store.for_bucket(store.bucket + "-b")
    await other.ensure_bucket()
    await other.put_bytes("k", b"v")
    assert not await store.exists("k")
    assert await other.get_bytes("k") == b"v"
