"""Prints the reliability summary table (summary.py) at the end of a run that ran any of
these tests."""

from __future__ import annotations

import pytest

from tests.reliability import summary


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if summary.TOTALS or summary.SCENARIOS:
        terminalreporter.write_line("")
        for line in summary.table().splitlines():
            terminalreporter.write_line(line)
