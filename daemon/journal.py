"""The daemon's record of the attempts it took: one small JSON file each, written atomically."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from daemon.progress import Progress

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class JournalEntry:
    """What the daemon knows about one attempt it took (the base for re-attach on restart)."""

    job_id: str
    attempt: int
    container_id: str = ""
    # seq of the last report published for this attempt (0: none yet).
    last_seq: int = 0
    # How far the attempt had got when last written.
    state: Progress = Progress.ACCEPTED
    # The raw DispatchMessage, so a restarted daemon knows the spec and its GPUs.
    dispatch_b64: str = ""
    # A service replica's restarts in place so far, and when its container first started
    # (Unix time): its run time counts from there, not from Docker's latest start.
    restarts: int = 0
    first_started: float = 0.0


class Journal:
    """Files under `directory`, one per attempt; each write is a temp file renamed over the
    old one (fsynced), so a crash leaves either the previous or the new record, never half."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, job_id: str, attempt: int) -> Path:
        return self.directory / f"{_UNSAFE.sub('_', job_id)}.{attempt}.json"

    def write(self, entry: JournalEntry) -> None:
        path = self._path(entry.job_id, entry.attempt)
        temporary = path.with_name(f".{path.name}.tmp")
        data = json.dumps(asdict(entry), sort_keys=True).encode()
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)

    def get(self, job_id: str, attempt: int) -> JournalEntry | None:
        return self._read(self._path(job_id, attempt))

    def update(self, job_id: str, attempt: int, **changes: Any) -> JournalEntry:
        """Rewrites the attempt's entry with `changes` (creating it if absent)."""
        current = self.get(job_id, attempt) or JournalEntry(job_id, attempt)
        entry = replace(current, **changes)
        self.write(entry)
        return entry

    def remove(self, job_id: str, attempt: int) -> None:
        self._path(job_id, attempt).unlink(missing_ok=True)

    def entries(self) -> list[JournalEntry]:
        """Every recorded attempt; unreadable files are logged and skipped."""
        found = (self._read(p) for p in sorted(self.directory.glob("*.json")))
        return [entry for entry in found if entry is not None]

    @staticmethod
    def _read(path: Path) -> JournalEntry | None:
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("journal file %s unreadable: %s", path, exc)
            return None
        fields = {k: v for k, v in raw.items() if k in JournalEntry.__dataclass_fields__}
        if "state" in fields:
            fields["state"] = Progress.journaled(fields["state"])
            if fields["state"] is None:
                log.warning("journal file %s names no known step: %s", path, raw["state"])
                return None
        try:
            return JournalEntry(**fields)
        except TypeError as exc:
            log.warning("journal file %s malformed: %s", path, exc)
            return None
