"""Validation of a submitted JobSpec: every problem names its field."""

from __future__ import annotations

import re

from gpuplane.v1 import types_pb2

from controlplane.errors import InvalidArgument

SHA256_RE = re.compile(r"[0-9a-f]{64}")

MAX_GPUS = 64
MAX_DURATION_SECONDS = 30 * 24 * 3600
MAX_PRICE = 10**12  # micro-credits per GPU-hour (a million credits)
MAX_STRING = 4096
MAX_ITEMS = 256
MAX_ENV_BYTES = 128 * 1024
# Upper bounds of a container's memory and /dev/shm: 16 TiB, beyond any host a provider runs
# and far below what Docker's int64 fields overflow on (2^63 - 1).
MAX_MEMORY_BYTES = 16 * 1024**4
MAX_SHM_BYTES = MAX_MEMORY_BYTES
MAX_VRAM_GIB = 4096
MAX_CPU_MILLICORES = 1024 * 1000
MAX_RETRIES = 20
MAX_BUDGET = 10**15  # micro-credits (a billion credits)
# Retries of a job whose spec leaves max_retries unset (infrastructure faults are retried).
DEFAULT_MAX_RETRIES = 2
# A Docker image reference: [registry[:port]/]path[:tag][@digest], conservatively.
IMAGE_RE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?$")
CC_RE = re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}$")
# Variables the daemon sets itself; a job may not override them.
RESERVED_ENV = frozenset({"NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "GPUPLANE_JOB_ID"})


def _text(field: str, value: str, limit: int = MAX_STRING) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"longer than {limit} characters")
    if "\x00" in value:
        raise InvalidArgument(field, "contains a NUL character")


def validate_labels(field: str, labels: dict[str, str]) -> None:
    if len(labels) > 64:
        raise InvalidArgument(field, "more than 64 labels")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"{field}[{key!r}]", "label keys are 1-128 of [A-Za-z0-9._/-]")
        _text(f"{field}[{key!r}]", value, 256)


def validate_spec(spec: types_pb2.JobSpec) -> None:
    """Raises InvalidArgument naming the first bad field of `spec`."""
    _validate_image_and_command(spec)
    _validate_env(spec)
    _validate_resources(spec)
    _validate_inputs(spec)
    _validate_limits_and_placement(spec)


def _validate_image_and_command(spec: types_pb2.JobSpec) -> None:
    if not spec.image:
        raise InvalidArgument("spec.image", "is required")
    if len(spec.image) > 512 or not IMAGE_RE.match(spec.image):
        raise InvalidArgument("spec.image", f"{spec.image[:80]!r} is not a valid image reference")
    for name, items in (("spec.command", spec.command), ("spec.args", spec.args)):
        if len(items) > MAX_ITEMS:
            raise InvalidArgument(name, f"more than {MAX_ITEMS} items")
        for i, item in enumerate(items):
            _text(f"{name}[{i}]", item)


def _validate_env(spec: types_pb2.JobSpec) -> None:
    env_bytes = 0
    for key, value in spec.env.items():
        if not ENV_NAME_RE.match(key):
            raise InvalidArgument(f"spec.env[{key!r}]", "is not a valid variable name")
        if key in RESERVED_ENV:
            raise InvalidArgument(
                f"spec.env[{key!r}]", "is set by gpuplane and cannot be overridden"
            )
        _text(f"spec.env[{key!r}]", value, MAX_ENV_BYTES)
        env_bytes += len(key) + len(value)
    if env_bytes > MAX_ENV_BYTES:
        raise InvalidArgument("spec.env", f"larger than {MAX_ENV_BYTES} bytes in total")


def _validate_resources(spec: types_pb2.JobSpec) -> None:
    if spec.gpu_count > MAX_GPUS:
        raise InvalidArgument("spec.gpu_count", f"at most {MAX_GPUS} GPUs on one host")
    if len(spec.gpu_models) > 32:
        raise InvalidArgument("spec.gpu_models", "more than 32 models")
    for i, model in enumerate(spec.gpu_models):
        if not model.strip():
            raise InvalidArgument(f"spec.gpu_models[{i}]", "must not be empty")
        _text(f"spec.gpu_models[{i}]", model, 100)
    if spec.min_vram_gib > MAX_VRAM_GIB:
        raise InvalidArgument("spec.min_vram_gib", f"larger than any GPU ({MAX_VRAM_GIB} GiB)")
    if spec.min_compute_capability and not CC_RE.match(spec.min_compute_capability):
        raise InvalidArgument("spec.min_compute_capability", 'must look like "8.0"')
    if spec.cpu_millicores > MAX_CPU_MILLICORES:
        raise InvalidArgument("spec.cpu_millicores", "more than 1024 cores")
    if spec.memory_bytes and spec.memory_bytes < 6 * 1024 * 1024:
        raise InvalidArgument("spec.memory_bytes", "below Docker's minimum of 6 MiB")
    if spec.memory_bytes > MAX_MEMORY_BYTES:
        raise InvalidArgument("spec.memory_bytes", "larger than 16 TiB")
    if spec.shm_bytes > MAX_SHM_BYTES:
        raise InvalidArgument("spec.shm_bytes", "larger than 16 TiB")
    if spec.network not in types_pb2.NetworkMode.values():
        raise InvalidArgument("spec.network", "unknown network mode")


def _validate_inputs(spec: types_pb2.JobSpec) -> None:
    if len(spec.inputs) > MAX_ITEMS:
        raise InvalidArgument("spec.inputs", f"more than {MAX_ITEMS} inputs")
    for i, entry in enumerate(spec.inputs):
        if not entry.key or entry.key.startswith("/") or ".." in entry.key.split("/"):
            raise InvalidArgument(f"spec.inputs[{i}].key", "must be a relative object key")
        if entry.path and (entry.path.startswith("/") or ".." in entry.path.split("/")):
            raise InvalidArgument(f"spec.inputs[{i}].path", "must be relative, inside /input")
        _text(f"spec.inputs[{i}].key", entry.key, 1024)
        _text(f"spec.inputs[{i}].path", entry.path, 1024)
        if entry.sha256 and not SHA256_RE.fullmatch(entry.sha256):
            raise InvalidArgument(f"spec.inputs[{i}].sha256", "must be 64 lower-case hex digits")


def _validate_limits_and_placement(spec: types_pb2.JobSpec) -> None:
    if spec.max_duration_seconds == 0:
        raise InvalidArgument("spec.max_duration_seconds", "is required (the attempt's time limit)")
    if spec.max_duration_seconds > MAX_DURATION_SECONDS:
        raise InvalidArgument("spec.max_duration_seconds", "longer than 30 days")
    if not 0 <= spec.max_price_per_gpu_hour_micro_credits <= MAX_PRICE:
        raise InvalidArgument(
            "spec.max_price_per_gpu_hour_micro_credits", f"must be 0..{MAX_PRICE}"
        )
    if not 0 <= spec.budget_micro_credits <= MAX_BUDGET:
        raise InvalidArgument("spec.budget_micro_credits", "must be 0..10^15")
    if not -1000 <= spec.priority <= 1000:
        raise InvalidArgument("spec.priority", "must be between -1000 and 1000")
    validate_labels("spec.labels", dict(spec.labels))
    validate_labels("spec.host_labels", dict(spec.host_labels))
    if spec.max_retries > MAX_RETRIES:
        raise InvalidArgument("spec.max_retries", f"at most {MAX_RETRIES}")
    if len(spec.retry_on_exit_codes) > 32:
        raise InvalidArgument("spec.retry_on_exit_codes", "more than 32 exit codes")
    for i, code in enumerate(spec.retry_on_exit_codes):
        if not 1 <= code <= 255:
            raise InvalidArgument(f"spec.retry_on_exit_codes[{i}]", "must be 1..255")
    if spec.min_reliability_permille > 1000:
        raise InvalidArgument("spec.min_reliability_permille", "must be 0..1000 (per mille)")
    if spec.placement_policy not in types_pb2.PlacementPolicy.values():
        raise InvalidArgument("spec.placement_policy", "unknown policy")
    if len(spec.locations) > 64 or len(spec.exclude_host_ids) > 1024:
        raise InvalidArgument("spec.locations", "too many entries")
    for name, items, limit in (
        ("spec.locations", spec.locations, 256),
        ("spec.exclude_host_ids", spec.exclude_host_ids, 64),
    ):
        for i, item in enumerate(items):
            _text(f"{name}[{i}]", item, limit)
