"""Starting a real local server for a fixture: one place for how a server that cannot start
fails the test (loudly, with devstack's message, never skipped)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from devstack import DevstackError, LocalServer

Server = TypeVar("Server", bound=LocalServer)
# How long each server `serve` started took to stop (name, seconds), in order: the session's
# servers stop in the last test's teardown, whose time the terminal summary breaks down.
STOPS: list[tuple[str, float]] = []


def start_or_message(start: Callable[[], object]) -> str | None:
    """Runs `start`; returns the DevstackError message instead of raising it."""
    try:
        start()
    except DevstackError as exc:
        return str(exc)
    return None


def serve(server: Server) -> Iterator[Server]:
    """Starts `server` for a fixture (`yield from serve(...)`) and stops it afterwards; a
    server that cannot start fails the test."""
    problem = start_or_message(server.start)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield server
    finally:
        began = time.monotonic()
        server.stop()
        STOPS.append((server.name, time.monotonic() - began))


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """A server process started by a test: SIGTERM, then SIGKILL if it has not ended within
    `timeout` seconds; waited for either way."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
