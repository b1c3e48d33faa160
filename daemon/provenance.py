"""The host's signed part of an attempt's provenance: what it ran, on which GPUs, what it stored."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.gpus import GpuInventory
from messaging.provenance import host_part
from messaging.signing import SigningKey, canonical


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the executor needs to sign provenance: the host's key and its GPUs' names."""

    key: SigningKey
    inventory: GpuInventory


def sign_provenance(
    facts: HostFacts,
    dispatch: messaging_pb2.DispatchMessage,
    host_id: str,
    image: dict[str, Any],
    clock: tuple[datetime | None, datetime | None],
    finished: dict[str, Any],
    scrub: types_pb2.ScrubAttestation | None = None,
) -> dict[str, bytes]:
    """The FINISHED report's `provenance` and `provenance_signature` fields; `finished` holds
    the report's exit_code, run_time_ms and manifest; `scrub` the GPU scrub attestation the
    same report carries (daemon/scrub.py)."""
    gpus = [
        {"uuid": uuid, "name": facts.inventory.by_uuid.get(uuid, types_pb2.Gpu()).name}
        for uuid in dispatch.gpu_uuids
    ]
    manifest: list[types_pb2.ResultObject] = list(finished.get("manifest", []))
    part = host_part(
        job_id=dispatch.job_id,
        attempt=dispatch.attempt,
        host_id=host_id,
        image=image,
        gpus=gpus,
        driver_version=facts.inventory.driver_version,
        started_at=clock[0],
        ended_at=clock[1],
        exit_code=finished.get("exit_code"),
        run_time_ms=int(finished.get("run_time_ms", 0)),
        outputs=[
            {"key": o.key, "path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256}
            for o in manifest
        ],
        scrub=None
        if scrub is None
        else json_format.MessageToDict(scrub, preserving_proto_field_name=True),
    )
    data = canonical(part)
    return {"provenance": data, "provenance_signature": facts.key.sign(data)}
