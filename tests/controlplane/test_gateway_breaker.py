"""The gateway's circuit breaker and replica choice on a fake clock: a circuit opens after 3
failures in a row, half-opens after 15 s with one trial at a time, closes on its success
and opens again on its failure; round-robin and least-outstanding choose among ready replicas
whose circuit lets a request through, and say why when none can."""

from __future__ import annotations

from controlplane.gateway.balancer import ServicePool, Strategy
from controlplane.gateway.breaker import Breaker, Circuit


def circuit(breaker: Breaker) -> Circuit:
    """The circuit now (a call, so that a type checker does not narrow it across calls)."""
    return breaker.circuit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_three_failures_half_opens_after_15_s_and_closes_on_success() -> None:
    clock = FakeClock()
    breaker = Breaker(clock)
    breaker.failure()
    breaker.failure()
    breaker.success()  # a success in between: the count starts again
    breaker.failure()
    breaker.failure()
    assert circuit(breaker) is Circuit.CLOSED
    breaker.failure()
    assert circuit(breaker) is Circuit.OPEN
    assert not breaker.acquire()
    clock.now += 14.999
    assert circuit(breaker) is Circuit.OPEN
    clock.now += 0.001
    assert circuit(breaker) is Circuit.HALF_OPEN
    assert breaker.acquire(), "the one trial"
    assert not breaker.acquire(), "one trial at a time"
    breaker.success()
    assert circuit(breaker) is Circuit.CLOSED
    assert breaker.acquire()
    assert breaker.acquire()


def test_a_failed_trial_opens_it_again_for_another_pause() -> None:
    clock = FakeClock()
    breaker = Breaker(clock)
    for _ in range(3):
        breaker.failure()
    clock.now += 15
    assert breaker.acquire()
    breaker.failure()  # one failure when half-open is enough
    assert circuit(breaker) is Circuit.OPEN
    clock.now += 10
    assert not breaker.acquire()
    clock.now += 5
    assert circuit(breaker) is Circuit.HALF_OPEN


def test_round_robin_skips_open_circuits_and_says_why_nothing_is_chosen() -> None:
    clock = FakeClock()
    pool = ServicePool(clock)
    assert pool.choose().reason == "no replica is ready"
    pool.update(["rep_a", "rep_b", "rep_c"])
    picked = []
    for _ in range(6):
        choice = pool.choose()
        assert choice.replica is not None
        picked.append(choice.replica.replica_id)
        pool.release(choice.replica, ok=choice.replica.replica_id != "rep_b")
    assert picked == ["rep_a", "rep_b", "rep_c"] * 2
    bad = pool.replicas["rep_b"]
    pool.release(bad, ok=False)  # its third failure in a row: open
    assert circuit(bad.breaker) is Circuit.OPEN
    chosen = {pool.choose().replica.replica_id for _ in range(4)}  # type: ignore[union-attr]
    assert chosen == {"rep_a", "rep_c"}
    retry = pool.choose(avoid={"rep_a", "rep_c"})
    assert retry.replica is None
    assert retry.reason == "every ready replica's circuit is open or was tried already"
    pool.update(["rep_b", "rep_d"])  # rep_b keeps its open breaker; rep_d is new
    assert set(pool.replicas) == {"rep_b", "rep_d"}
    assert pool.replicas["rep_b"].breaker is bad.breaker


def test_least_outstanding_takes_the_least_busy_replica() -> None:
    pool = ServicePool(FakeClock(), Strategy.LEAST_OUTSTANDING)
    pool.update(["rep_a", "rep_b"])
    first = pool.choose().replica
    second = pool.choose().replica
    assert first is not None
    assert second is not None
    assert {first.replica_id, second.replica_id} == {"rep_a", "rep_b"}
    pool.release(first, ok=True)
    third = pool.choose().replica
    assert third is first, "the one whose request was answered"
    assert (first.outstanding, second.outstanding) == (1, 1)
