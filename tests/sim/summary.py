"""Lines the simulation tests want printed after the run (see conftest.py)."""

LINES: list[str] = []
