"""An attempt's provenance document: the host's signed part, the control plane's countersigned
part, and the offline check of a downloaded result set against it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from messaging.signing import SigningKey, b64, canonical, unb64, verify

FORMAT = "gpuplane.provenance/1"
HOST_FORMAT = "gpuplane.provenance.host/1"
FILE_NAME = "provenance.json"
# How far billed run time may exceed the control plane's own clock (first RUNNING accepted to
# the terminal report accepted): report latency at each end.
CLOCK_SLACK_MS = 5_000


def host_part(
    *,
    job_id: str,
    attempt: int,
    host_id: str,
    image: dict[str, Any],
    gpus: list[dict[str, str]],
    driver_version: str,
    started_at: datetime | None,
    ended_at: datetime | None,
    exit_code: int | None,
    run_time_ms: int,
    outputs: list[dict[str, Any]],
    scrub: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the host states about an attempt it ran (times by its own clock); `scrub` is the
    GPU scrub attestation (None until the daemon makes one)."""
    return {
        "format": HOST_FORMAT,
        "job_id": job_id,
        "attempt": attempt,
        "host_id": host_id,
        "image": image,
        "gpus": gpus,
        "driver_version": driver_version,
        "host_clock": {"started_at": _iso(started_at), "ended_at": _iso(ended_at)},
        "exit_code": exit_code,
        "run_time_ms": run_time_ms,
        "outputs": outputs,
        "scrub": scrub,
    }


def countersign(
    host_bytes: bytes,
    host_signature: bytes,
    control_plane: dict[str, Any],
    key: SigningKey,
) -> str:
    """The whole document (JSON text): the host's part and signature under the control
    plane's signature of both with its own part."""
    signed = {
        "host": json.loads(host_bytes),
        "host_signature": b64(host_signature),
        "control_plane": control_plane,
    }
    document = {
        "format": FORMAT,
        **signed,
        "control_plane_public_key": b64(key.public_bytes),
        "control_plane_signature": b64(key.sign(canonical(signed))),
    }
    return json.dumps(document, indent=2, sort_keys=True)


def is_canonical(data: bytes) -> bool:
    """Whether `data` is a JSON object in the canonical form its signature covers."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return False
    return isinstance(parsed, dict) and canonical(parsed) == data


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


class VerifyFailed(Exception):
    """The first check of `verify_results` that failed, named in the message."""


@dataclass(frozen=True, slots=True)
class Verified:
    job_id: str
    attempt: int
    outputs: int
    billed_run_time_ms: int


def verify_results(root: Path, pinned_key: bytes | None = None) -> Verified:
    """Checks root/provenance.json and the files beside it offline: the control plane's
    signature (by `pinned_key` when given), the host's signature by the key the control plane
    countersigned, each output's size and SHA-256, and that the billed run time fits both
    clocks. Raises VerifyFailed naming the first thing that fails."""
    document = _load(root / FILE_NAME)
    host, cp = _signatures(document, pinned_key)
    outputs = host.get("outputs") or []
    for output in outputs:
        _check_output(root, output)
    billed = _int(cp, "billed_run_time_ms")
    _check_clocks(host, cp, billed)
    return Verified(str(host.get("job_id")), _int(host, "attempt"), len(outputs), billed)


def _load(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyFailed(f"{path.name}: not found (download with --download)") from None
    except (OSError, ValueError) as exc:
        raise VerifyFailed(f"{path.name}: unreadable ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise VerifyFailed(f"{path.name}: not a {FORMAT} document")
    return document


def _signatures(
    document: dict[str, Any], pinned_key: bytes | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    host, cp = document.get("host"), document.get("control_plane")
    if not isinstance(host, dict) or not isinstance(cp, dict):
        raise VerifyFailed("provenance: the host or control_plane part is missing")
    try:
        cp_key = unb64(str(document.get("control_plane_public_key", "")))
        cp_signature = unb64(str(document.get("control_plane_signature", "")))
        host_key = unb64(str(cp.get("host_public_key", "")))
        host_signature = unb64(str(document.get("host_signature", "")))
    except ValueError as exc:
        raise VerifyFailed(f"provenance: a key or signature is not base64 ({exc})") from None
    if pinned_key is not None and cp_key != pinned_key:
        raise VerifyFailed("control_plane_public_key: not the control plane's key")
    signed = {"host": host, "host_signature": document["host_signature"], "control_plane": cp}
    if not verify(cp_key, cp_signature, canonical(signed)):
        raise VerifyFailed("control_plane_signature: does not match the document")
    if not verify(host_key, host_signature, canonical(host)):
        raise VerifyFailed("host_signature: does not match the host's part")
    return host, cp


def _check_output(root: Path, output: dict[str, Any]) -> None:
    relative = str(output.get("path", ""))
    parts = PurePosixPath(relative).parts
    if not relative or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise VerifyFailed(f"output {relative!r}: not a path inside the result set")
    path = root.joinpath(*parts)
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as data:
            while chunk := data.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    except OSError:
        raise VerifyFailed(f"output {relative}: missing from {root}") from None
    if size != output.get("size_bytes"):
        raise VerifyFailed(
            f"output {relative}: {size} bytes, provenance says {output.get('size_bytes')}"
        )
    if digest.hexdigest() != str(output.get("sha256", "")).lower():
        raise VerifyFailed(f"output {relative}: sha256 {digest.hexdigest()} does not match")


def _check_clocks(host: dict[str, Any], cp: dict[str, Any], billed: int) -> None:
    slack = _int(cp, "clock_slack_ms")
    for name, part, start, end in (
        ("control plane's", cp, "running_at", "ended_at"),
        ("host's", host, "started_at", "ended_at"),
    ):
        clock = part.get("control_plane_clock" if part is cp else "host_clock") or {}
        try:
            began = datetime.fromisoformat(str(clock.get(start)))
            ended = datetime.fromisoformat(str(clock.get(end)))
        except ValueError:
            if billed:
                raise VerifyFailed(
                    f"billed_run_time_ms: the {name} clock has no start and end"
                ) from None
            continue
        observed = int((ended - began).total_seconds() * 1000)
        if billed > observed + slack:
            raise VerifyFailed(
                f"billed_run_time_ms: {billed} ms exceeds the {name} clock "
                f"({observed} ms + {slack} ms slack)"
            )


def _int(part: dict[str, Any], name: str) -> int:
    value = part.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise VerifyFailed(f"{name}: missing or not a count")
    return value
