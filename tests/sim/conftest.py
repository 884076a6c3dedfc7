"""Prints what the simulation covered at the end of the test run (seed count, fault mix)."""

from __future__ import annotations

from typing import Any

from tests.sim import summary


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in summary.LINES:
        terminalreporter.write_line(line)
