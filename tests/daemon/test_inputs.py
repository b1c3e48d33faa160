"""fetch_inputs against real S3: inputs carrying a SHA-256 are checked after download, a
mismatch is InputCorrupt (reported as STOP_REASON_INPUT_CORRUPT) and leaves no file behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.endings import START_FAILURES
from daemon.inputs import InputCorrupt, InputError, fetch_inputs
from storage import layout
from storage.objects import ObjectStore


async def test_matching_and_unchecked_inputs_are_placed(store: ObjectStore, tmp_path: Path) -> None:
    await store.put_bytes(layout.input_key("t1", "a.bin"), b"alpha")
    inputs = [
        types_pb2.JobInput(key="a.bin", sha256=hashlib.sha256(b"alpha").hexdigest()),
        types_pb2.JobInput(key="a.bin", path="unchecked.bin"),
    ]
    assert await fetch_inputs(store, "t1", inputs, tmp_path) == 10
    assert (tmp_path / "a.bin").read_bytes() == b"alpha"
    assert (tmp_path / "unchecked.bin").read_bytes() == b"alpha"


async def test_a_mismatch_is_input_corrupt(store: ObjectStore, tmp_path: Path) -> None:
    await store.put_bytes(layout.input_key("t1", "b.bin"), b"changed")
    recorded = hashlib.sha256(b"original").hexdigest()
    with pytest.raises(InputCorrupt) as caught:
        await fetch_inputs(
            store, "t1", [types_pb2.JobInput(key="b.bin", sha256=recorded)], tmp_path
        )
    actual = hashlib.sha256(b"changed").hexdigest()
    assert str(caught.value) == (
        f"input 'b.bin' is corrupt: its 7 bytes hash to sha256 {actual}, "
        f"not {recorded} as recorded when it was uploaded"
    )
    assert list(tmp_path.iterdir()) == []


def test_corrupt_and_unavailable_inputs_are_told_apart() -> None:
    def reason(exc: Exception) -> int:
        return next(r for kind, r in START_FAILURES.items() if isinstance(exc, kind))

    assert reason(InputCorrupt("x")) == messaging_pb2.STOP_REASON_INPUT_CORRUPT
    assert reason(InputError("x")) == messaging_pb2.STOP_REASON_INPUT_UNAVAILABLE
