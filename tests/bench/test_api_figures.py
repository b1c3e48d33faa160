"""The API figures of scripts/bench: an absolute maximum where lower is better, and
submit_qps_32 measured beside pg_tx."""

from __future__ import annotations

from bench.cli import format_table
from bench.registry import REGISTRY, Result, plan
from bench.submit import TARGET_SUBMITS_PER_SECOND
from bench.telemetry import MAX_SUBMIT_P99_MS, SUBMITS_PER_SECOND


def test_an_absolute_maximum_is_checked_where_lower_is_better() -> None:
    def p99(figure: float) -> Result:
        return Result(
            "submit_p99_idle", figure, "ms", None, None, None, None, "lower", 1.0, maximum=10.0
        )

    assert p99(9.5).meets_target is True
    assert p99(10.5).meets_target is False
    assert "<= 10 ms MISSED" in format_table([p99(10.5)])
    assert "<= 10 ms ok" in format_table([p99(4.0)])


def test_submit_figures_carry_the_issues_targets() -> None:
    assert REGISTRY["submit_p99_idle"].maximum == MAX_SUBMIT_P99_MS == 10.0
    assert SUBMITS_PER_SECOND == 200
    throughput = REGISTRY["submit_qps_32"]
    assert throughput.minimum == TARGET_SUBMITS_PER_SECOND == 2000
    assert [b.name for b in plan(["submit_qps_32"])] == ["pg_tx", "submit_qps_32"]
