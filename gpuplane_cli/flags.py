"""Errors in the CLI's words: a request field named by the control plane becomes its flag."""

from __future__ import annotations

import argparse
import re

# Request field → the flag (or argument) that sets it. Used only where the command has that
# flag (its dest is among the parsed arguments): `apply` sets spec fields from a file, not
# flags, and keeps the server's names.
FIELD_FLAGS: dict[str, str] = {
    "spec.image": "--image",
    "spec.command": "--entrypoint",
    "spec.args": "COMMAND (after --)",
    "spec.env": "--env",
    "spec.gpu_count": "--gpus",
    "spec.gpu_models": "--gpu-model",
    "spec.min_vram_gib": "--min-vram",
    "spec.min_compute_capability": "--min-compute-capability",
    "spec.cpu_millicores": "--cpus",
    "spec.memory_bytes": "--memory",
    "spec.shm_bytes": "--shm-size",
    "spec.network": "--network",
    "spec.max_duration_seconds": "--max-duration",
    "spec.max_price_per_gpu_hour_micro_credits": "--max-price",
    "spec.budget_micro_credits": "--budget",
    "spec.priority": "--priority",
    "spec.labels": "--label",
    "spec.host_labels": "--host-label",
    "spec.max_retries": "--max-retries",
    "spec.retry_on_exit_codes": "--retry-on-exit-code",
    "spec.placement_policy": "--placement",
    "spec.locations": "--location",
    "spec.min_reliability_permille": "--min-reliability",
    "spec.inputs": "--input",
    "idempotency_key": "--idempotency-key",
    "reason": "--reason",
    "labels": "--label",
    "states": "--state",
    "location": "--location",
    "price_per_gpu_hour_micro_credits": "--price-per-gpu-hour",
    "max_price_per_gpu_hour_micro_credits": "--max-price",
    "gpu_type": "--gpu-type",
    "tenant_id": "--tenant",
    "provider_tenant_id": "--provider",
    "destination": "--destination",
    "reference": "--reference",
    "description": "--description",
    "amount_micro_credits": "AMOUNT",
    "alert_percents": "--alert-at",
    "monthly_limit_micro_credits": "--monthly-limit",
    "kinds": "--kind",
    "account_kinds": "--account",
    "all_tenants": "--all",
    "group_by": "--by",
    "payout_id": "PAYOUT",
    "job_id": "JOB",
    "host_id": "HOST",
    "id_prefix": "JOB/HOST (its start)",
    "duration_seconds": "--hours",
    "ssh_public_keys": "--ssh-key",
    "session_id": "SESSION",
    "port": "--port",
    "replicas": "--replicas",
    "health_path": "--health-path",
    "service": "NAME",
    "key_id": "KEY_ID",
}
# The flag's dest when it is not the flag's name: positional arguments and `-- COMMAND`.
_DEST = {
    "JOB": "job_id",
    "HOST": "host_id",
    "AMOUNT": "amount",
    "PAYOUT": "payout_id",
    "--all": "all",
    "--by": "by",
    "--kind": "kind",
    "--account": "account",
    "COMMAND (after --)": "image",
    "JOB/HOST (its start)": "",
    "SESSION": "session_id",
    "NAME": "service",
    "KEY_ID": "key_id",
}
# `spec.env['X']`, `spec.gpu_models[2]`, `spec.inputs[0].key`: the field, an index, the rest.
_FIELD = re.compile(r"(?P<field>[a-z_][a-z_.]*?)(?:\[(?P<index>[^\]]*)\](?P<rest>\.[a-z_.]+)?)?: ")


def flag_of(field: str, args: argparse.Namespace) -> str | None:
    """The flag that sets `field` in this command, or None."""
    flag = FIELD_FLAGS.get(field)
    if flag is None:
        return None
    dest = _DEST.get(flag, flag.lstrip("-").replace("-", "_"))
    return flag if dest == "" or hasattr(args, dest) else None


def in_flags(details: str, args: argparse.Namespace) -> str:
    """`details` ("spec.memory_bytes: larger than ...") with its leading field named by its
    flag ("--memory: larger than ..."); unchanged when the command has no such flag."""
    match = _FIELD.match(details)
    if match is None:
        return details
    flag = flag_of(match["field"], args)
    if flag is None:
        return details
    index = match["index"]
    if index is None:
        where = flag
    elif index.isdigit():
        where = f"{flag} (#{int(index) + 1})"
    else:
        where = f"{flag} {index}"
    if match["rest"]:
        where += f" ({match['rest'].lstrip('.')})"
    return f"{where}: {details[match.end() :]}"
