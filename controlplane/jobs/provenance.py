"""An attempt's provenance: the host's signed part kept from its report, countersigned when
the attempt is settled with what the control plane itself recorded."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from gpuplane.v1 import messaging_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.jobs.billing import billable_ms
from controlplane.jobs.models import Job, JobAttempt
from controlplane.registry.repository import RegistryRepository
from messaging.provenance import CLOCK_SLACK_MS, countersign, is_canonical
from messaging.signing import SigningKey, b64, verify

log = logging.getLogger(__name__)


def keep_host_part(attempt: JobAttempt, report: messaging_pb2.JobReport) -> None:
    """The host's part and signature, as its (signed) report carried them."""
    if report.provenance:
        attempt.host_provenance = report.provenance
        attempt.host_provenance_signature = report.provenance_signature


async def countersign_attempt(
    session: AsyncSession, job: Job, attempt: JobAttempt, key: SigningKey, now: datetime
) -> None:
    """Stores the attempt's countersigned document, if its host's part checks out: signed by
    the host's registered key, about this attempt, listing exactly its stored manifest."""
    host_bytes, signature = attempt.host_provenance, attempt.host_provenance_signature
    if not host_bytes or not signature:
        return
    host = await RegistryRepository(session).get_host(attempt.host_id)
    host_key = None if host is None else host.signing_public_key
    problem = _problem(job, attempt, host_bytes, signature, host_key)
    if problem is not None:
        log.warning("provenance of %s/%s not countersigned: %s", job.id, attempt.attempt, problem)
        return
    assert host_key is not None
    control_plane: dict[str, Any] = {
        "job_id": job.id,
        "attempt": attempt.attempt,
        "host_id": attempt.host_id,
        "host_public_key": b64(host_key),
        "control_plane_clock": {
            "running_at": _iso(attempt.started_at),
            "ended_at": _iso(attempt.finished_at or now),
        },
        "clock_slack_ms": CLOCK_SLACK_MS,
        "billed_run_time_ms": 0 if attempt.lost else billable_ms(job, attempt),
        "charged_micro_credits": attempt.charged,
        "attempt_state": attempt.state,
        "countersigned_at": now.isoformat(),
    }
    attempt.provenance = countersign(host_bytes, signature, control_plane, key)


def _problem(
    job: Job, attempt: JobAttempt, host_bytes: bytes, signature: bytes, host_key: bytes | None
) -> str | None:
    if host_key is None or not verify(host_key, signature, host_bytes):
        return "not signed by the host's registered key"
    if not is_canonical(host_bytes):
        return "not canonical JSON"
    part = json.loads(host_bytes)
    claimed = (part.get("job_id"), part.get("attempt"), part.get("host_id"))
    if claimed != (job.id, attempt.attempt, attempt.host_id):
        return f"about {claimed}, not this attempt"
    listed = sorted((o.get("key"), o.get("sha256"), o.get("size_bytes")) for o in part["outputs"])
    stored = sorted((o.get("key"), o.get("sha256"), o.get("size_bytes")) for o in attempt.manifest)
    if listed != stored:
        return "its outputs are not the attempt's manifest"
    return None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
