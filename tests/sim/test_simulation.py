"""The election core against thousands of hostile worlds, and proof that the worlds bite.

The default run covers LEADER_SIDECAR_SIM_SEEDS seeds (10,000); `python -m tests.sim --seeds
1000000` is the soak. Every planted bug below must be caught within the default seeds.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.election.core import MAX_REQUESTS_PER_RETRY_PERIOD, ElectionCore
from sidecar.election.record import LeaderRecord
from tests.sim import summary
from tests.sim.sweep import MakeCore, run_seeds, sweep
from tests.sim.world import TIMINGS, Violation, simulate

SEEDS = int(os.environ.get("LEADER_SIDECAR_SIM_SEEDS", "10000"))


@pytest.mark.timeout(600)
def test_no_invariant_breaks_in_any_seed() -> None:
    result = sweep(SEEDS)
    summary.LINES.extend(result.describe())
    assert result.seeds == SEEDS
    assert not result.violations, (
        f"{len(result.violations)} seeds break an invariant; replay one with "
        f"`python -m tests.sim --replay SEED`:\n" + "\n".join(result.violations[:5])
    )
    # Every fault kind was exercised, and leadership kept moving.
    assert len(result.faults) == 15
    assert result.leaders > SEEDS


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.large_base_example,
        HealthCheck.data_too_large,
    ],
)
@given(st.randoms(use_true_random=False))
def test_no_invariant_breaks_in_shrinkable_worlds(rng: random.Random) -> None:
    """The same worlds with Hypothesis choosing every random draw, so a failure shrinks to a
    small schedule of faults."""
    simulate(-1, rng=rng, trace=True)


# ------------------------------------------------------------------------- planted bugs


class RenewsTheRecordItRead(ElectionCore):
    """Issue 10, bug 1: a leader renews the record it read (whoever it names) and checks the
    holder only later."""

    def _own_record(self, wall: datetime) -> LeaderRecord:
        if self._record is None:
            return super()._own_record(wall)
        read = self._record.record
        return replace(read, renew_time=wall, lease_duration_seconds=3)

    def _is_ours(self, record: LeaderRecord) -> bool:
        return self._leading or super()._is_ours(record)


class ClaimsForTheWholeLease(ElectionCore):
    """Counts leadership to the lease duration instead of the renew deadline."""

    def is_leader(self, now: float) -> bool:
        return self._leading and self._announced and now < self._last_renew + 3.0


class ClaimsRightAfterCreating(ElectionCore):
    """No creation wait: a deleted Lease's holder may still act."""

    def _maybe_announce(self, now: float, out: list[object]) -> None:  # type: ignore[override]
        self._claim_not_before = 0.0
        super()._maybe_announce(now, out)  # type: ignore[arg-type]


class TrustsItsName(ElectionCore):
    """Issue 10, bug 9: a record with our identity is ours, whichever process wrote it."""

    def _is_ours(self, record: LeaderRecord) -> bool:
        return record.holder_identity == self.identity and self._term is not None


class HammersTheServer(ElectionCore):
    """Issue 10, bug 4: retries at once after conflicts and errors, with no request budget."""

    def _budget_allows(self, now: float) -> bool:
        return True

    def _jittered(self, seconds: float) -> float:
        return 0.0


PLANTED: dict[str, type[ElectionCore]] = {
    "renews the record it read": RenewsTheRecordItRead,
    "claims for the whole lease": ClaimsForTheWholeLease,
    "claims right after creating": ClaimsRightAfterCreating,
    "trusts its name": TrustsItsName,
    "hammers the server": HammersTheServer,
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_a_planted_bug_is_caught_within_the_default_seeds(bug: str) -> None:
    kind = PLANTED[bug]
    make: MakeCore = lambda identity, rng: kind(identity, TIMINGS, rng)  # noqa: E731
    result = run_seeds(0, SEEDS, make_core=make, stop_at_first=True)
    assert result.violations, f"the planted bug {bug!r} survived {SEEDS} seeds"
    summary.LINES.append(
        f"simulation: planted bug {bug!r} caught at seed {result.seeds - 1}: "
        + result.violations[0].split("\n")[0]
    )


def test_a_failing_seed_replays_with_its_trace() -> None:
    make: MakeCore = lambda identity, rng: TrustsItsName(identity, TIMINGS, rng)  # noqa: E731
    found = run_seeds(0, SEEDS, make_core=make, stop_at_first=True)
    seed = found.seeds - 1
    with pytest.raises(Violation) as first:
        simulate(seed, make_core=make, trace=True)
    with pytest.raises(Violation) as again:
        simulate(seed, make_core=make, trace=True)
    assert str(first.value) == str(again.value)  # deterministic, trace included
    assert "trace (true time, replica <- event -> actions)" in str(first.value)


def test_the_request_budget_is_what_the_core_promises() -> None:
    assert MAX_REQUESTS_PER_RETRY_PERIOD == 5
