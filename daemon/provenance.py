"""The host's signed part of an attempt's provenance: what it ran, on which GPUs, what it stored."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from docker.errors import DockerException
from google.protobuf import json_format
from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.gpus import GpuInventory
from messaging.provenance import host_part
from messaging.signing import SigningKey, canonical

if TYPE_CHECKING:
    from daemon.runtime import DockerRuntime
    from daemon.scrub import Scrubber

log = logging.getLogger(__name__)


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


async def finished_attestations(
    runtime: DockerRuntime,
    facts: HostFacts | None,
    scrubber: Scrubber | None,
    dispatch: messaging_pb2.DispatchMessage,
    host_id: str,
    finished: dict[str, Any],
    ended: datetime,
    image_attrs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a FINISHED report adds to `finished` (its exit_code, run_time_ms and manifest):
    the scrub attestation of the attempt's GPUs (their container removed by now) and the
    host's signed provenance part, which includes it (none without a key). `image_attrs`:
    the image's inspect as the attempt read it before creating its container (else asked)."""
    scrub = None if scrubber is None else await scrubber.check(dispatch.gpu_uuids)
    fields: dict[str, Any] = {} if scrub is None else {"scrub": scrub}
    if facts is None:
        return fields
    try:
        image = await runtime.image_identity(dispatch.spec.image, image_attrs)
    except (DockerException, OSError, TimeoutError) as exc:
        log.warning("image identity of %s not read: %s", dispatch.spec.image, exc)
        image = None
    started = ended - timedelta(milliseconds=int(finished["run_time_ms"]))
    image = image or {"reference": dispatch.spec.image, "digest": ""}
    clock = (started, ended)
    return fields | sign_provenance(facts, dispatch, host_id, image, clock, finished, scrub)
