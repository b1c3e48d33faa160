"""Stores an attempt's results with bounded retries; says "upload_failed" when it cannot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.settings import DaemonSettings
from storage.objects import ObjectStore, StorageError
from storage.upload import ManifestMismatch, OutputTooLarge, upload_attempt, verify_attempt

log = logging.getLogger(__name__)

# The FINISHED reason the control plane recognises for results that could not be stored.
UPLOAD_FAILED = "upload_failed"
_MAX_BACKOFF_SECONDS = 30.0


async def store_results(
    store: ObjectStore,
    dispatch: messaging_pb2.DispatchMessage,
    output_dir: Path,
    log_files: Mapping[str, Path],
    settings: DaemonSettings,
) -> tuple[list[types_pb2.ResultObject], str]:
    """Uploads outputs, logs and the manifest; returns (manifest, reason).

    Every stored object is then read back and checked against the manifest (size, SHA-256)
    before the manifest is returned; a mismatch is a failed try like any other.
    Transient failures are retried `settings.upload_attempts` times with exponential backoff
    from `upload_retry_base_seconds` (capped at 30 s). After the last one the reason is
    "upload_failed" and the manifest is empty. Outputs over `output_max_bytes` are never
    stored: the logs alone are (same retries), and the reason is "upload_failed: <why>".
    """
    outputs: Path | None = output_dir
    reason = ""
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
            )
            # What settles the job is what is stored, not what was sent: read it back.
            if await verify_attempt(store, dispatch.job_id, dispatch.attempt) != manifest:
                raise ManifestMismatch("the stored manifest.json differs from the one sent")
            return manifest, reason
        except OutputTooLarge as exc:
            log.warning("%s/%s: %s; storing the logs only", dispatch.job_id, dispatch.attempt, exc)
            outputs, reason = None, f"{UPLOAD_FAILED}: {exc}"
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
    return [], UPLOAD_FAILED
