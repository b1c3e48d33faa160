"""The local end of an exec or port-forward: stdin read in chunks off the event loop, raw mode."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import termios
import threading
import tty
from collections.abc import Iterator

# Bytes read from stdin (or a forwarded connection) per message: bounded, like every hop's
# chunks, and as large as the control plane takes (fewer, larger messages: less per-message work).
CHUNK = 256 * 1024


class StdinReader:
    """Reads a file descriptor on a daemon thread (a blocked read never holds up the exit),
    at most two chunks ahead of the consumer: a slow tunnel slows the reading."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._permits = threading.Semaphore(2)
        threading.Thread(target=self._run, name="stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._permits.acquire()
            try:
                data = os.read(self.fd, CHUNK)
            except OSError:
                data = b""
            self._loop.call_soon_threadsafe(self._chunks.put_nowait, data)
            if not data:
                return

    async def read(self) -> bytes:
        """The next chunk; b"" at end of input."""
        data = await self._chunks.get()
        self._permits.release()
        return data


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of the local terminal (80×24 when there is none)."""
    size = shutil.get_terminal_size((80, 24))
    return size.lines, size.columns


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """The terminal on `fd` in raw mode (keys, Ctrl-C included, go to the remote side as they
    are), restored on the way out; nothing when `fd` is not a terminal."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def write_out(data: bytes, stream: int = 1) -> None:
    """Writes to stdout (1) or stderr (2) at once (blocking: the tunnel waits for it)."""
    out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
    out.write(data)
    out.flush()
