"""Weighted fair share between tenants on recent GPU time (no I/O).

Each tenant's recent GPU time is GPU-seconds with exponential decay (a half-life); a tenant's key is
(decayed GPU time + its running GPUs × a horizon) ÷ its weight, and the scheduler serves the
lowest key first. Counting running GPUs as if they ran for the horizon makes a placement
move the key at once, so within one cycle tenants interleave instead of the first taking
every free GPU."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

# Decayed GPU time below this (GPU-seconds) is forgotten, so memory follows active tenants.
FORGET_BELOW = 1e-3


@dataclass(frozen=True, slots=True)
class FairShareConfig:
    half_life_s: float = 3600.0
    horizon_s: float = 600.0
    weights: Mapping[str, float] = field(default_factory=dict)
    default_weight: float = 1.0

    def weight(self, tenant_id: str) -> float:
        return max(self.weights.get(tenant_id, self.default_weight), 1e-6)


class FairShare:
    def __init__(self, config: FairShareConfig | None = None) -> None:
        self.config = config or FairShareConfig()
        self.gpu_seconds: dict[str, float] = {}
        self.at: float | None = None
        # Weights read with the queue (tenants' fair_share_weight); the config's otherwise.
        self.weights: dict[str, float] = {}

    def advance(self, now: float, running: Mapping[str, int]) -> None:
        """Decays GPU time to `now` and adds the GPUs that ran since the last call (`running`:
        GPUs per tenant over that time), integrated exactly under the decay."""
        if self.at is None or now <= self.at:
            self.at = now if self.at is None else self.at
            return
        elapsed = now - self.at
        decay = 0.5 ** (elapsed / self.config.half_life_s)
        # ∫ gpus × 0.5^((now - t) / half_life) dt over the interval
        gained = self.config.half_life_s / math.log(2) * (1 - decay)
        for tenant in list(self.gpu_seconds):
            self.gpu_seconds[tenant] *= decay
        for tenant, gpus in running.items():
            if gpus:
                self.gpu_seconds[tenant] = self.gpu_seconds.get(tenant, 0.0) + gpus * gained
        for tenant in [t for t, u in self.gpu_seconds.items() if u < FORGET_BELOW]:
            del self.gpu_seconds[tenant]
        self.at = now

    def seed(self, tenant_id: str, gpu_seconds: float) -> None:
        """Adds GPU time from history (e.g. attempts that ended before this process led)."""
        self.gpu_seconds[tenant_id] = self.gpu_seconds.get(tenant_id, 0.0) + gpu_seconds

    def key(self, tenant_id: str, running_gpus: int) -> float:
        used = self.gpu_seconds.get(tenant_id, 0.0) + running_gpus * self.config.horizon_s
        weight = self.weights.get(tenant_id)
        return used / (max(weight, 1e-6) if weight is not None else self.config.weight(tenant_id))
