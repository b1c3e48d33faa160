"""The restart policy of service replicas on a fake clock: growing backoff, the window's cap,
restarts counted over the whole attempt, and the window forgetting old restarts."""

from __future__ import annotations

from daemon.restarts import MAX_DELAY_SECONDS, Restart, RestartPolicy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_restart_waits_twice_as_long_then_the_window_is_used_up() -> None:
    clock = Clock()
    policy = RestartPolicy(base=1.0, max_restarts=3, window=300.0, clock=clock)
    assert policy.next() == Restart(1, 1.0)
    clock.now += 5
    assert policy.next() == Restart(2, 2.0)
    clock.now += 5
    assert policy.next() == Restart(3, 4.0)
    clock.now += 5
    assert policy.next() is None, "3 restarts within 300 s: the attempt ends"
    assert policy.next() is None
    assert policy.made == 3


def test_restarts_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    policy = RestartPolicy(base=1.0, max_restarts=2, window=60.0, clock=clock)
    assert policy.next() == Restart(1, 1.0)
    clock.now += 30
    assert policy.next() == Restart(2, 2.0)
    clock.now += 29
    assert policy.recent() == 2
    assert policy.next() is None
    clock.now += 2  # the first restart is 61 s old: one left in the window
    assert policy.recent() == 1
    assert policy.next() == Restart(3, 2.0), "counted over the attempt, backoff by the window"
    clock.now += 61  # both old now: the backoff starts over
    assert policy.next() == Restart(4, 1.0)


def test_the_backoff_is_capped_and_zero_restarts_means_none() -> None:
    clock = Clock()
    policy = RestartPolicy(base=10.0, max_restarts=10, window=1e9, clock=clock)
    delays = [r.delay for r in iter(policy.next, None)]
    assert delays[:3] == [10.0, 20.0, 30.0]
    assert max(delays) == MAX_DELAY_SECONDS
    assert len(delays) == 10
    assert RestartPolicy(max_restarts=0, clock=clock).next() is None


def test_a_daemon_restart_counts_on_from_the_journal() -> None:
    policy = RestartPolicy(base=1.0, max_restarts=3, clock=Clock(), made=2)
    assert policy.next() == Restart(3, 1.0)
