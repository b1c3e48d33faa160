"""Reliability scores (registry/reliability.py): the prior, decay by age, and a host scored
over its provider's other hosts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from controlplane.registry.reliability import HALF_LIFE, ProviderBook, note_outcome

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


@dataclass
class Row:
    provider_tenant_id: str = "p"
    reliability_good: float = 0.0
    reliability_bad: float = 0.0
    reliability_at: datetime | None = None


def score(host: Row, *others: Row, now: datetime = NOW) -> int:
    return ProviderBook([host, *others], now).host_permille(host)


def test_a_newcomer_starts_from_the_prior_not_from_a_hundred_percent() -> None:
    book = ProviderBook([Row()], NOW)
    assert (book.provider_permille("p"), book.host_permille(Row())) == (900, 900)
    assert book.provider_permille("nobody") == 900


def test_outcomes_fade_with_the_half_life() -> None:
    bad = Row(reliability_bad=10, reliability_at=NOW)
    assert score(bad) == 300  # 4.5 / 15
    assert score(bad, now=NOW + HALF_LIFE) == 450  # 10 bad count as 5: 4.5 / 10
    assert score(bad, now=NOW + 10 * HALF_LIFE) == 898  # back near the prior


def test_note_outcome_decays_what_was_counted_first() -> None:
    host = Row()
    note_outcome(host, True, NOW)
    note_outcome(host, True, NOW)
    note_outcome(host, False, NOW + HALF_LIFE)
    assert (host.reliability_good, host.reliability_bad) == (1.0, 1.0)
    assert host.reliability_at == NOW + HALF_LIFE
    # A clock that went backwards decays nothing (and never grows a count).
    note_outcome(host, True, NOW)
    assert host.reliability_good == 2.0


def test_a_host_is_scored_over_its_providers_other_hosts() -> None:
    bad = Row(reliability_bad=4, reliability_at=NOW)
    fresh = Row()
    # The fresh host stands where its provider does: (0 + 4.5) / 9.
    assert score(fresh, bad) == 500
    # Another provider's record does not count.
    assert score(Row(provider_tenant_id="q"), bad) == 900
    # Its own good record lifts it above the provider's: (10 + 5 × 0.5) / 15.
    good = Row(reliability_good=10, reliability_at=NOW)
    assert score(good, bad) == 833
    # And its own outcomes are not counted twice (once as the provider's).
    assert score(bad, Row()) == score(bad) == 500  # 4.5 / 9
