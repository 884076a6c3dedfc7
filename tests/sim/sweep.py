"""Run many seeds of the simulation on all cores: used by the tests and by `python -m tests.sim`.

A violation is reported with its seed; `python -m tests.sim --replay SEED` prints its trace.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.election.core import ElectionCore
from tests.sim.world import TIMINGS, Violation, simulate

MakeCore = Callable[[str, random.Random], ElectionCore]


@dataclass
class Sweep:
    seeds: int = 0
    seconds: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    leaders: int = 0
    worst_quiet_leader: float = 0.0
    violations: list[str] = field(default_factory=list)

    def merge(self, other: Sweep) -> None:
        self.seeds += other.seeds
        self.faults.update(other.faults)
        self.leaders += other.leaders
        self.worst_quiet_leader = max(self.worst_quiet_leader, other.worst_quiet_leader)
        self.violations.extend(other.violations)

    def describe(self) -> list[str]:
        mix = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items()))
        return [
            f"simulation: {self.seeds} seeds in {self.seconds:.1f}s, "
            f"{len(self.violations)} invariant violations, {self.leaders} leadership terms, "
            f"first leader after the faults at most {self.worst_quiet_leader:.2f}s "
            f"(timings {TIMINGS})",
            f"simulation fault mix (seeds with each fault): {mix}",
        ]


def run_seeds(
    first: int, count: int, make_core: MakeCore | None = None, stop_at_first: bool = False
) -> Sweep:
    sweep = Sweep()
    for seed in range(first, first + count):
        sweep.seeds += 1
        try:
            result = simulate(seed, make_core=make_core)
        except Violation as exc:
            sweep.violations.append(str(exc))
            if stop_at_first:
                break
            continue
        sweep.faults.update(result.faults)
        sweep.leaders += result.leaders
        sweep.worst_quiet_leader = max(sweep.worst_quiet_leader, result.first_quiet_leader)
    return sweep


def _chunk(bounds: tuple[int, int]) -> Sweep:
    return run_seeds(*bounds)


def sweep(seeds: int, first: int = 0, workers: int | None = None) -> Sweep:
    """All seeds in [first, first + seeds), spread over processes."""
    started = time.monotonic()
    workers = workers or os.cpu_count() or 1
    size = max(1, min(2000, seeds // (workers * 4) or 1))
    chunks = [
        (start, min(size, first + seeds - start)) for start in range(first, first + seeds, size)
    ]
    total = Sweep()
    if workers == 1:
        for chunk in chunks:
            total.merge(_chunk(chunk))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for part in pool.imap_unordered(_chunk, chunks):
                total.merge(part)
    total.seconds = time.monotonic() - started
    return total
