"""One process per data dir: an exclusive flock on a lock file in it, holding the owner's pid."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


class DirLocked(Exception):
    """Another live process holds the lock of `directory`."""

    def __init__(self, directory: Path, holder_pid: str) -> None:
        super().__init__(f"{directory} is locked by pid {holder_pid}")
        self.directory = directory
        self.holder_pid = holder_pid  # "?" when the holder has not written it yet


def lock_dir(directory: Path, name: str, *, mode: int = 0o777) -> IO[str]:
    """Takes DIRECTORY/NAME (made with `mode` if missing) exclusively without waiting, writes
    this pid in it and returns the open file: the lock is held until it is closed or the
    process ends, whichever way it ends (flock: a lock file left behind is not a lock).
    Raises DirLocked, naming the holder's pid, when another process holds it."""
    directory.mkdir(parents=True, exist_ok=True, mode=mode)
    fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "?"
        handle.close()
        raise DirLocked(directory, holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
