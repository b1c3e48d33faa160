"""Where things live in the bucket. Every attempt writes under its own prefix."""

from __future__ import annotations


def attempt_prefix(job_id: str, attempt: int) -> str:
    """jobs/<job_id>/<attempt>/: outputs under output/, logs under logs/, manifest.json."""
    return f"jobs/{job_id}/{attempt}/"


def inside(key: str, prefix: str) -> bool:
    """Whether object `key` lies under `prefix` (no climbing out with ".."). Keys in a
    manifest come from the provider's daemon: read or presign only those under the attempt's
    own prefix, never one naming another job's (or tenant's) objects."""
    return key.startswith(prefix) and ".." not in key.split("/")


def output_key(job_id: str, attempt: int, relative_path: str) -> str:
    return f"{attempt_prefix(job_id, attempt)}output/{relative_path}"


def log_key(job_id: str, attempt: int, stream: str) -> str:
    """stream is "stdout" or "stderr"."""
    return f"{attempt_prefix(job_id, attempt)}logs/{stream}"


def manifest_key(job_id: str, attempt: int) -> str:
    return f"{attempt_prefix(job_id, attempt)}manifest.json"


def input_key(tenant_id: str, key: str) -> str:
    """Inputs are addressed per tenant so one tenant can never name another's objects."""
    return f"inputs/{tenant_id}/{key.lstrip('/')}"
