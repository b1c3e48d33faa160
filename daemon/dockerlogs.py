"""A container's stdout and stderr followed on one connection, each chunk named by its stream."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

# Docker's multiplexed log frame: stream (1 stdout, 2 stderr), 3 zero bytes, big-endian length.
_HEADER = struct.Struct(">BxxxL")
_STREAMS = {1: "stdout", 2: "stderr"}


def follow_logs(
    api: Any, container_id: str, *, tty: bool, tail: int | str = "all", since: float | None = None
) -> Iterator[tuple[str, bytes]]:
    """("stdout" | "stderr", chunk) until the container stops: one GET /logs for both streams
    (the SDK's logs() opens one per stream and inspects the container first to learn whether
    it has a terminal, which the caller knows). A terminal's output is all "stdout"."""
    params: dict[str, Any] = {"stdout": 1, "stderr": 1, "follow": 1, "timestamps": 0}
    params["tail"] = tail
    if since is not None and since > 0:
        params["since"] = since
    response = api._get(api._url("/containers/{0}/logs", container_id), params=params, stream=True)
    try:
        api._raise_for_status(response)
        # No read timeout: a quiet job may write nothing for hours.
        api._disable_socket_timeout(api._get_raw_response_socket(response))
        if tty:
            for chunk in response.iter_content(None):  # as it arrives
                yield "stdout", chunk
            return
        while len(header := response.raw.read(_HEADER.size)) == _HEADER.size:
            kind, length = _HEADER.unpack(header)
            if not length:
                continue
            data = response.raw.read(length)
            if not data:
                return
            yield _STREAMS.get(kind, "stdout"), data
    finally:
        response.close()
