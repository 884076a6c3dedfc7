"""Shard ownership (`--shards N`) in the simulation: N shard elections per replica while
replicas join, leave, crash, pause, flap their health and release shards.

The default run covers LEADER_SIDECAR_SIM_SHARD_SEEDS seeds (200; each runs N shards x M
replicas, so one costs about as much as 20 single-election seeds). A planted stealing bug must
be caught within them.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
from collections import Counter
from datetime import datetime

import pytest

from sidecar.election import core
from sidecar.election.record import VersionedRecord
from sidecar.shards.assignment import assign, spread
from sidecar.shards.core import ShardAction, ShardedAction, ShardedCore
from tests.sim import summary
from tests.sim.shard_world import (
    SHARD_FAULTS,
    ShardResult,
    ShardWorld,
    settle_bound,
    shard_seeds,
    simulate_shards,
)
from tests.sim.world import TIMINGS, Violation

SEEDS = int(os.environ.get("LEADER_SIDECAR_SIM_SHARD_SEEDS", "200"))


def _chunk(bounds: tuple[int, int]) -> tuple[int, list[str], list[ShardResult]]:
    return shard_seeds(*bounds)


@pytest.mark.timeout(600)
def test_no_shard_invariant_breaks_in_any_seed() -> None:
    workers = os.cpu_count() or 1
    size = max(1, SEEDS // (workers * 4))
    chunks = [(start, min(size, SEEDS - start)) for start in range(0, SEEDS, size)]
    violations: list[str] = []
    results: list[ShardResult] = []
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _, bad, good in pool.imap_unordered(_chunk, chunks):
            violations.extend(bad)
            results.extend(good)
    assert not violations, f"{len(violations)} shard seeds break an invariant:\n" + "\n".join(
        violations[:5]
    )
    mix: Counter[str] = Counter()
    for result in results:
        mix.update(result.faults)
    assert set(mix) == set(SHARD_FAULTS)
    worst = max(r.settled_after for r in results)
    assert worst <= settle_bound()
    summary.LINES.append(
        f"simulation (shards): {len(results)} seeds, 0 violations, "
        f"{sum(r.claims for r in results)} shard terms, {sum(r.moves for r in results)} moves, "
        f"all owned and balanced at most {worst:.2f}s after the faults stopped "
        f"(bound {settle_bound():.2f}s); faults: "
        + ", ".join(f"{name} {count}" for name, count in sorted(mix.items()))
    )


class TakesItsShardAtOnce(ShardedCore):
    """The stealing bug: once the assignment names this replica, it assumes the old owner let
    go and shows its core the record as released (instead of waiting for the release)."""

    def _rebalance(self, now: float, wall: datetime, out: list[ShardedAction]) -> None:
        super()._rebalance(now, wall, out)
        for i, election in enumerate(self.cores):
            seen = election._record
            if (
                self.desired[i] == self.identity
                and seen is not None
                and seen.record.holder_identity not in ("", self.identity)
            ):
                fake = VersionedRecord(seen.record.released(wall), seen.version)
                for action in election.step(core.WatchEvent(fake), now, wall):
                    out.append(ShardAction(i, action))


def test_the_planted_stealing_bug_is_caught_within_the_default_seeds() -> None:
    def make(identity: str, shards: int, rng: random.Random) -> ShardedCore:
        return TakesItsShardAtOnce(identity, shards, TIMINGS, rng)

    ran, violations, _ = shard_seeds(0, SEEDS, make_core=make, stop_at_first=True)
    assert violations, f"the stealing bug survived {SEEDS} shard seeds"
    summary.LINES.append(
        f"simulation (shards): planted stealing bug caught at seed {ran - 1}: "
        + violations[0].split("\n")[0]
    )


def _settle(world: ShardWorld, start: float, limit: float) -> float:
    t = start
    while t < limit:
        t += TIMINGS.retry_period / 4
        world.run(t)
        owners = world.ownership()
        if all(owners) and spread(owners, [r.identity for r in world.live()]) <= 1:
            return t
    raise AssertionError(f"not settled by {limit}: {world.ownership()}")


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(("shards", "replicas"), [(32, 5), (8, 3), (7, 4)])
@pytest.mark.parametrize("change", ["join", "leave", "crash"])
def test_one_join_or_leave_moves_at_most_ceil_n_over_m_plus_one_shards(
    seed: int, shards: int, replicas: int, change: str
) -> None:
    world = ShardWorld(seed, replicas=replicas, shards=shards, faults=())
    settled = _settle(world, 0.0, 20.0)
    world.run(settled + TIMINGS.lease_duration)
    before = world.ownership()
    assert before == assign([r.identity for r in world.live()], shards, before)
    moves_before = world.moves
    live = world.live()
    if change == "join":
        world.spawn(world.new_name(), at=world.now)
    elif change == "leave":
        world.deliver(world.rng.choice(live), core.Shutdown())
    else:
        victim = world.rng.choice(live)
        victim.alive = False
        victim.crashed = True
    start = world.now
    world.run(start + 0.5)
    settled = _settle(world, world.now, start + 3 * TIMINGS.lease_duration)
    members = max(replicas, len(world.live()))
    moved = world.moves - moves_before
    assert moved <= math.ceil(shards / members) + 1, (before, world.ownership())
    assert spread(world.ownership(), [r.identity for r in world.live()]) <= 1
    # and then nothing moves
    after = world.ownership()
    world.run(world.now + 3 * TIMINGS.lease_duration)
    assert world.ownership() == after
    if change == "crash":  # the crashed replica's shards: once its lease and record expire
        assert settled - start <= TIMINGS.lease_duration * 1.1 / 0.9 + 1.0


def test_a_failing_shard_seed_replays_with_its_trace() -> None:
    def make(identity: str, shards: int, rng: random.Random) -> ShardedCore:
        return TakesItsShardAtOnce(identity, shards, TIMINGS, rng)

    ran, _, _ = shard_seeds(0, SEEDS, make_core=make, stop_at_first=True)
    with pytest.raises(Violation) as first:
        simulate_shards(ran - 1, make_core=make, trace=True)
    with pytest.raises(Violation) as again:
        simulate_shards(ran - 1, make_core=make, trace=True)
    assert str(first.value) == str(again.value)


def test_a_crashed_replicas_member_record_is_deleted_after_ten_lease_durations() -> None:
    world = ShardWorld(3, replicas=3, shards=4, faults=())
    settled = _settle(world, 0.0, 20.0)
    victim = world.live()[0]
    victim.alive = False
    victim.crashed = True
    world.run(settled + 5 * TIMINGS.lease_duration)
    assert victim.identity in world.members  # still there: only housekeeping, not urgent
    world.run(settled + 12 * TIMINGS.lease_duration)
    assert victim.identity not in world.members
    assert set(world.members) == {r.identity for r in world.live()}


@pytest.mark.parametrize("seed", range(4))
def test_a_released_shard_is_owned_by_another_replica_within_a_few_retry_periods(
    seed: int,
) -> None:
    from sidecar.shards.core import ReleaseShard

    world = ShardWorld(seed, replicas=3, shards=6, faults=())
    settled = _settle(world, 0.0, 20.0)
    world.run(settled + 1.0)
    owners = world.ownership()
    releaser = next(r for r in world.live() if r.identity == owners[2])
    world.deliver(releaser, ReleaseShard(2))
    start = world.now
    while world.ownership()[2] in ("", releaser.identity):
        assert world.now < start + 6 * TIMINGS.retry_period / 0.9, world.ownership()
        world.run(world.now + 0.01)
    assert world.ownership()[2] != releaser.identity
    _settle(world, world.now, world.now + 3 * TIMINGS.lease_duration)
