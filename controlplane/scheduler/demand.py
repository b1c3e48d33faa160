"""What a queued job asks of the scheduler, distilled once from its JobSpec (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from gpuplane.v1 import types_pb2

GIB = 1 << 30
Policy = types_pb2.PlacementPolicy


def parse_cc(value: str) -> tuple[int, int]:
    """ "8.9" → (8, 9); anything unparsable is (0, 0)."""
    major, _, minor = value.partition(".")
    try:
        return int(major), int(minor or 0)
    except ValueError:
        return 0, 0


@dataclass(frozen=True, slots=True)
class Demand:
    job_id: str
    tenant_id: str
    priority: int
    gpu_count: int
    # Lower-cased substrings of allowed NVML names; empty allows any model.
    gpu_models: tuple[str, ...]
    min_vram_bytes: int
    min_cc: tuple[int, int]
    # 0 = no limit.
    max_price: int
    locations: frozenset[str]
    host_labels: tuple[tuple[str, str], ...]
    exclude: frozenset[str]
    allow_simulated: bool
    policy: int
    max_duration_s: float
    # When the job (this attempt) became placeable, in seconds since the epoch.
    queued_since: float
    # Hosts scoring below this (per mille) cannot take the job; 0 = any.
    min_reliability: int = 0
    # Hosts that have not passed hardware verification may take the job.
    allow_unverified: bool = False

    @property
    def gpu_key(self) -> tuple[tuple[str, ...], int, tuple[int, int]]:
        """The GPU-level constraints: jobs sharing them match the same GPU classes."""
        return self.gpu_models, self.min_vram_bytes, self.min_cc

    @property
    def signature(self) -> tuple[object, ...]:
        """Everything placement depends on except identity and time: jobs with one
        signature get the same "why pending" explanation in a cycle."""
        return (
            self.gpu_count,
            self.gpu_key,
            self.max_price,
            self.locations,
            self.host_labels,
            self.exclude,
            self.allow_simulated,
            self.min_reliability,
            self.allow_unverified,
        )


def demand_of(
    job_id: str,
    tenant_id: str,
    spec: types_pb2.JobSpec,
    queued_since: float,
    *,
    allow_simulated_default: bool = False,
    default_policy: int = Policy.PLACEMENT_POLICY_CHEAPEST,
) -> Demand:
    models = tuple(sorted({m.strip().lower() for m in spec.gpu_models if m.strip()}))
    policy = spec.placement_policy or default_policy
    return Demand(
        job_id=job_id,
        tenant_id=tenant_id,
        priority=spec.priority,
        gpu_count=spec.gpu_count,
        gpu_models=models,
        min_vram_bytes=spec.min_vram_gib * GIB,
        min_cc=parse_cc(spec.min_compute_capability) if spec.min_compute_capability else (0, 0),
        max_price=spec.max_price_per_gpu_hour_micro_credits,
        locations=frozenset(spec.locations),
        host_labels=tuple(sorted(spec.host_labels.items())),
        exclude=frozenset(spec.exclude_host_ids),
        allow_simulated=spec.allow_simulated or allow_simulated_default,
        min_reliability=spec.min_reliability_permille,
        allow_unverified=spec.allow_unverified,
        policy=policy,
        max_duration_s=float(spec.max_duration_seconds),
        queued_since=queued_since,
    )
