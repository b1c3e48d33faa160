"""`jobs results --download` shows a bar per object on a terminal, as `data put` does."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from gpuplane_cli.follow import download_all


@pytest.fixture
def served_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on loopback, and its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_a_download_shows_its_bar(served_dir: tuple[Path, str], tmp_path: Path) -> None:
    root, base = served_dir
    data = os.urandom(2 * 1024 * 1024 + 5)
    (root / "a.bin").write_bytes(data)
    obj = types_pb2.ResultObject(
        path="out/a.bin",
        url=f"{base}/a.bin",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    bar = io.StringIO()
    target = tmp_path / "results"
    response = jobs_pb2.GetResultsResponse(objects=[obj])
    await download_all(response, target, quiet=True, progress_to=bar)
    assert (target / "out" / "a.bin").read_bytes() == data
    frames = bar.getvalue().rstrip("\n").split("\r")
    assert frames[-1] == "out/a.bin [" + "#" * 30 + "] 100% 2.0MiB/2.0MiB"
    assert len(frames) >= 2  # drawn as it went, not only at the end
