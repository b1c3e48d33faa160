"""Stores an attempt's results with bounded retries; says why (a StopReason) when it cannot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.settings import DaemonSettings
from storage.objects import StorageError
from storage.upload import ObjectWriter, OutputTooLarge, upload_attempt

log = logging.getLogger(__name__)

StopReason = messaging_pb2.StopReason
_MAX_BACKOFF_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Stored:
    """What store_results stored, and why not all of it when it did not."""

    manifest: list[types_pb2.ResultObject] = field(default_factory=list)
    # STOP_REASON_UNSPECIFIED (all stored), _OUTPUT_TOO_LARGE or _UPLOAD_FAILED.
    failure: messaging_pb2.StopReason.ValueType = StopReason.STOP_REASON_UNSPECIFIED
    detail: str = ""


async def store_results(
    store: ObjectWriter,
    dispatch: messaging_pb2.DispatchMessage,
    output_dir: Path,
    log_files: Mapping[str, Path],
    settings: DaemonSettings,
) -> Stored:
    """Uploads outputs, logs and the manifest; returns the manifest stored.

    The daemon cannot read its results back (its grant only writes): each object's ETag, the
    MD5 of what the server stored, is checked against the bytes sent instead; a mismatch is a
    failed try like any other.
    Transient failures are retried `settings.upload_attempts` times with exponential backoff
    from `upload_retry_base_seconds` (capped at 30 s). After the last one the failure is
    STOP_REASON_UPLOAD_FAILED and the manifest is empty. Outputs over `output_max_bytes` are
    never stored: the logs alone are (same retries), the failure is
    STOP_REASON_OUTPUT_TOO_LARGE and the detail says why.
    """
    outputs: Path | None = output_dir
    # Why the outputs were left out, once they were.
    too_large = ""
    logs = {name: path for name, path in log_files.items() if path.exists()}
    for attempt in range(1, settings.upload_attempts + 1):
        try:
            manifest = await upload_attempt(
                store,
                dispatch.job_id,
                dispatch.attempt,
                outputs,
                logs,
                max_output_bytes=settings.output_max_bytes,
                max_object_bytes=getattr(store, "max_object_bytes", 0),
            )
            if too_large:
                return Stored(manifest, StopReason.STOP_REASON_OUTPUT_TOO_LARGE, too_large)
            return Stored(manifest)
        except OutputTooLarge as exc:
            log.warning("%s/%s: %s; storing the logs only", dispatch.job_id, dispatch.attempt, exc)
            outputs, too_large = None, str(exc) or "the outputs are too large"
            continue
        except (StorageError, OSError) as exc:
            log.warning(
                "%s/%s: storing results failed (try %d of %d): %s",
                dispatch.job_id,
                dispatch.attempt,
                attempt,
                settings.upload_attempts,
                exc,
            )
        if attempt < settings.upload_attempts:
            delay = settings.upload_retry_base_seconds * 2 ** (attempt - 1)
            await asyncio.sleep(min(delay, _MAX_BACKOFF_SECONDS))
    return Stored(failure=StopReason.STOP_REASON_UPLOAD_FAILED)
