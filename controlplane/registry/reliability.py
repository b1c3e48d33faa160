"""Reliability of hosts and providers: outcomes decayed by age over a Beta prior."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

# The prior a provider nobody has seen yet starts from: 90 % of attempts completed, worth
# PRIOR_WEIGHT outcomes. Not 100 %: a newcomer has earned nothing, so a host of a provider
# with a record beats it at the same price under the balanced policy.
PRIOR_RATE = 0.9
PRIOR_WEIGHT = 5.0
# An outcome counts half after HALF_LIFE, a quarter after two: old outcomes fade and the
# score drifts back towards the provider's (and the provider's towards the prior).
HALF_LIFE = timedelta(days=7)


class Record(Protocol):
    """A host's decayed outcome counts (registry.models.Host's reliability columns)."""

    provider_tenant_id: str
    reliability_good: float
    reliability_bad: float
    reliability_at: datetime | None


def _epoch(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def decay(at: datetime | None, now: datetime) -> float:
    """The weight left at `now` of outcomes counted up to `at`."""
    if at is None:
        return 0.0
    age = max(0.0, _epoch(now) - _epoch(at))
    return math.pow(0.5, age / HALF_LIFE.total_seconds())


def note_outcome(host: Record, ok: bool, now: datetime) -> None:
    """Counts one outcome of the host: a completed attempt (`ok`), or an attempt lost to a
    host fault or a GPU fault. The counts kept are decayed to `now` first."""
    weight = decay(host.reliability_at, now)
    host.reliability_good = (host.reliability_good or 0.0) * weight + (1.0 if ok else 0.0)
    host.reliability_bad = (host.reliability_bad or 0.0) * weight + (0.0 if ok else 1.0)
    host.reliability_at = now


@dataclass(slots=True)
class Outcomes:
    good: float = 0.0
    bad: float = 0.0

    def rate(self, prior_rate: float, weight: float = PRIOR_WEIGHT) -> float:
        """The Beta posterior mean: the outcomes with `weight` pseudo-outcomes at `prior_rate`."""
        return (self.good + weight * prior_rate) / (self.good + self.bad + weight)


def outcomes_of(host: Record, now: datetime) -> Outcomes:
    weight = decay(host.reliability_at, now)
    return Outcomes((host.reliability_good or 0.0) * weight, (host.reliability_bad or 0.0) * weight)


class ProviderBook:
    """Every provider's outcomes (the sum over all its hosts, revoked and lost ones included)
    and each host's score over its provider's: a host's prior is its provider's rate from
    its other hosts, so a fresh machine id of a provider starts where the provider stands,
    and a re-registration (the same host row) keeps what the host earned."""

    def __init__(self, hosts: Iterable[Record], now: datetime) -> None:
        self.now = now
        self.totals: dict[str, Outcomes] = {}
        for host in hosts:
            seen = outcomes_of(host, now)
            total = self.totals.setdefault(host.provider_tenant_id, Outcomes())
            total.good += seen.good
            total.bad += seen.bad

    def provider_permille(self, provider: str) -> int:
        return _permille(self.totals.get(provider, Outcomes()).rate(PRIOR_RATE))

    def host_permille(self, host: Record) -> int:
        own = outcomes_of(host, self.now)
        total = self.totals.get(host.provider_tenant_id, Outcomes())
        others = Outcomes(max(0.0, total.good - own.good), max(0.0, total.bad - own.bad))
        return _permille(own.rate(others.rate(PRIOR_RATE)))


def _permille(rate: float) -> int:
    return max(0, min(1000, round(1000 * rate)))
