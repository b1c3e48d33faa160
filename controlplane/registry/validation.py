"""What the registry checks of a host's registration and offer (RegisterHost, UpdateHost)."""

from __future__ import annotations

from collections.abc import Mapping

from gpuplane.v1 import registry_pb2

from controlplane.errors import InvalidArgument
from controlplane.registry.telemetry import MAX_GPUS_PER_HOST
from messaging.signing import PUBLIC_KEY_BYTES


def validate_registration(request: registry_pb2.RegisterHostRequest, max_price: int) -> None:
    """What RegisterHost checks of its request, each field named in the error."""
    if not request.machine_id or len(request.machine_id) > 200:
        raise InvalidArgument("machine_id", "is required (at most 200 characters)")
    if not request.hostname or len(request.hostname) > 255:
        raise InvalidArgument("hostname", "is required (at most 255 characters)")
    if not request.gpus:
        raise InvalidArgument("gpus", "a host must offer at least one GPU")
    if len(request.gpus) > MAX_GPUS_PER_HOST:
        raise InvalidArgument("gpus", f"at most {MAX_GPUS_PER_HOST} GPUs per host")
    seen: set[str] = set()
    for i, gpu in enumerate(request.gpus):
        if not gpu.uuid or len(gpu.uuid) > 100:
            raise InvalidArgument(f"gpus[{i}].uuid", "is required (at most 100 characters)")
        if gpu.uuid in seen:
            raise InvalidArgument(f"gpus[{i}].uuid", f"{gpu.uuid} appears twice")
        seen.add(gpu.uuid)
        if not gpu.name or len(gpu.name) > 200:
            raise InvalidArgument(f"gpus[{i}].name", "is required (at most 200 characters)")
        if gpu.memory_total_bytes == 0:
            raise InvalidArgument(f"gpus[{i}].memory_total_bytes", "must be positive")
    if request.signing_public_key and len(request.signing_public_key) != PUBLIC_KEY_BYTES:
        raise InvalidArgument(
            "signing_public_key", f"must be a raw Ed25519 public key ({PUBLIC_KEY_BYTES} bytes)"
        )
    validate_offer(
        request.price_per_gpu_hour_micro_credits, request.location, request.labels, max_price
    )


def validate_offer(
    price: int | None, location: str | None, labels: Mapping[str, str] | None, max_price: int
) -> None:
    """What RegisterHost and UpdateHost check of a host's price, location and labels."""
    if price is not None and (price <= 0 or price > max_price):
        raise InvalidArgument(
            "price_per_gpu_hour_micro_credits", f"must be between 1 and {max_price}"
        )
    if location is not None and len(location) > 100:
        raise InvalidArgument("location", "at most 100 characters")
    if labels is not None and len(labels) > 64:
        raise InvalidArgument("labels", "at most 64 labels")
