"""What the reliability tests tried and saw, added up for the table printed at the end of the
run (conftest.py): faults injected, requests tried, jobs run, and the things that must stay
zero (lost jobs, double settlements, ledger imbalance, unexpected INTERNAL)."""

from __future__ import annotations

from collections import Counter

# The rows of the table, in order; tests add to them with `record()`.
ROWS = (
    ("faults_injected", "faults injected"),
    ("requests_tried", "requests tried"),
    ("jobs_run", "jobs run"),
    ("lost_jobs", "lost jobs (must be 0)"),
    ("double_settlements", "double settlements (must be 0)"),
    ("ledger_imbalance", "ledger imbalance, micro-credits (must be 0)"),
    ("unexpected_internal", "unexpected INTERNAL (must be 0)"),
)
TOTALS: Counter[str] = Counter()
# Per scenario: what it tried, e.g. {"kill -9 daemon mid-job": "1 fault, 2 jobs"}.
SCENARIOS: dict[str, str] = {}


def record(scenario: str, note: str = "", **counts: int) -> None:
    """Adds `counts` (keys from ROWS) to the totals and notes what the scenario did."""
    for key, value in counts.items():
        if key not in dict(ROWS):
            raise KeyError(f"unknown summary row {key!r}")
        TOTALS[key] += value
    if note:
        SCENARIOS[scenario] = note


def table() -> str:
    width = max(len(label) for _, label in ROWS)
    lines = ["reliability summary", "-" * (width + 12)]
    lines += [f"{label:<{width}}  {TOTALS[key]:>10,}" for key, label in ROWS]
    if SCENARIOS:
        lines += ["", "scenarios:"]
        lines += [f"  {name}: {note}" for name, note in sorted(SCENARIOS.items())]
    return "\n".join(lines)
