"""upload_attempt against a real S3 server: layout, manifest last, hashes, idempotence."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import urllib.request
from pathlib import Path

import pytest

from storage import layout
from storage.objects import ObjectStore, StorageError, StoredObject
from storage.upload import OutputTooLarge, upload_attempt


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def make_outputs(root: Path) -> Path:
    out = root / "output"
    (out / "sub").mkdir(parents=True)
    (out / "result.txt").write_bytes(b"42\n")
    (out / "sub" / "data.bin").write_bytes(os.urandom(4096))
    return out


async def test_layout_and_manifest(store: ObjectStore, tmp_path: Path) -> None:
    out = make_outputs(tmp_path)
    stderr = tmp_path / "stderr.log"
    stderr.write_bytes(b"warning\n")
    manifest = await upload_attempt(store, "job1", 2, out, {"stdout": b"hello\n", "stderr": stderr})
    paths = [o.path for o in manifest]
    assert paths == ["output/result.txt", "output/sub/data.bin", "logs/stderr", "logs/stdout"]
    prefix = layout.attempt_prefix("job1", 2)
    keys = sorted(o.key for o in await store.list(prefix))
    assert keys == sorted([*(o.key for o in manifest), layout.manifest_key("job1", 2)])
    assert layout.output_key("job1", 2, "sub/data.bin") in keys
    assert await store.get_bytes(layout.log_key("job1", 2, "stdout")) == b"hello\n"
    document = json.loads(await store.get_bytes(layout.manifest_key("job1", 2)))
    assert document == [
        {"key": o.key, "path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256}
        for o in manifest
    ]


async def test_manifest_sha256_matches_bytes_behind_presigned_url(
    store: ObjectStore, tmp_path: Path
) -> None:
    out = make_outputs(tmp_path)
    manifest = await upload_attempt(store, "job2", 1, out, {"stdout": b"x"})
    for entry in manifest:
        url = await store.presign_get(entry.key, 60)
        body = await asyncio.to_thread(fetch, url)
        assert hashlib.sha256(body).hexdigest() == entry.sha256
        assert len(body) == entry.size_bytes


class RecordingStore(ObjectStore):
    """The real store, noting the order in which writes complete; can fail one key."""

    def __init__(self, real: ObjectStore, fail_key: str = "") -> None:
        self.__dict__.update(real.__dict__)  # same client, same bucket
        self.completed: list[str] = []
        self.fail_key = fail_key

    async def put_file(self, key: str, path: Path) -> StoredObject:
        if key == self.fail_key:
            raise StorageError(f"injected failure for {key}")
        stored = await super().put_file(key, path)
        self.completed.append(key)
        return stored

    async def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        stored = await super().put_bytes(key, data, content_type)
        self.completed.append(key)
        return stored


async def test_manifest_is_written_last(store: ObjectStore, tmp_path: Path) -> None:
    out = make_outputs(tmp_path)
    recording = RecordingStore(store)
    manifest = await upload_attempt(recording, "job3", 1, out, {"stdout": b"a", "stderr": b"b"})
    assert len(recording.completed) == len(manifest) + 1
    assert recording.completed[-1] == layout.manifest_key("job3", 1)


async def test_no_manifest_when_an_output_fails(store: ObjectStore, tmp_path: Path) -> None:
    out = make_outputs(tmp_path)
    failing = RecordingStore(store, fail_key=layout.output_key("job7", 1, "result.txt"))
    with pytest.raises(StorageError, match="injected"):
        await upload_attempt(failing, "job7", 1, out, {"stdout": b"a"})
    assert not await store.exists(layout.manifest_key("job7", 1))


async def test_reupload_same_attempt_overwrites_same_keys(
    store: ObjectStore, tmp_path: Path
) -> None:
    out = make_outputs(tmp_path)
    first = await upload_attempt(store, "job4", 1, out, {"stdout": b"one"})
    (out / "result.txt").write_bytes(b"43\n")
    second = await upload_attempt(store, "job4", 1, out, {"stdout": b"one"})
    assert [o.key for o in first] == [o.key for o in second]
    assert len(await store.list(layout.attempt_prefix("job4", 1))) == len(first) + 1
    assert await store.get_bytes(layout.output_key("job4", 1, "result.txt")) == b"43\n"
    changed = {o.path: o.sha256 for o in second}
    assert changed["output/result.txt"] == hashlib.sha256(b"43\n").hexdigest()


async def test_symlinks_escaping_output_are_not_followed(
    store: ObjectStore, tmp_path: Path
) -> None:
    out = make_outputs(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret")
    (out / "escape").symlink_to(secret)
    (out / "absolute").symlink_to("/etc/passwd")
    (out / "dangling").symlink_to("missing")
    (out / "inside").symlink_to("result.txt")
    (out / "loop").symlink_to(out)
    manifest = await upload_attempt(store, "job5", 1, out, {})
    assert [o.path for o in manifest] == [
        "output/inside",
        "output/result.txt",
        "output/sub/data.bin",
    ]
    assert await store.get_bytes(layout.output_key("job5", 1, "inside")) == b"42\n"


async def test_outputs_over_the_limit_are_refused_before_any_upload(
    store: ObjectStore, tmp_path: Path
) -> None:
    out = make_outputs(tmp_path)
    with pytest.raises(OutputTooLarge, match="over this host's limit of 1000 bytes"):
        await upload_attempt(store, "job6", 1, out, {"stdout": b"x"}, max_output_bytes=1000)
    assert await store.list(layout.attempt_prefix("job6", 1)) == []
