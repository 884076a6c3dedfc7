"""A rolling update in the simulation: leadership moves once, to the new revision."""

from __future__ import annotations

import functools

import pytest

from sidecar.election import core
from tests.sim.world import TIMINGS, World


@pytest.mark.parametrize("seed", range(20))
def test_a_rollout_moves_leadership_exactly_once_to_the_new_revision(seed: int) -> None:
    world = World(seed, replicas=3, faults=())
    world.run(6.0)
    (leader,) = [r for r in world.replicas if r.claims(world.now)]
    terms_before = len(world.claims)
    # The rollout: new pods start one by one; once the first is ready, the old ones know
    # they are outdated. Old pods go away afterwards (SIGTERM), oldest first.
    old = list(world.replicas)
    for i, when in enumerate((6.0, 7.0, 8.0)):
        world.spawn(f"new{i}", at=when)
    world.run(6.5)
    for replica in old:
        world.deliver(replica, core.SetOutdated(True))
    for i, replica in enumerate(old):
        world.at(9.0 + i, functools.partial(world.deliver, replica, core.Shutdown()))
    world.run(9.0 + len(old) + 3 * TIMINGS.lease_duration)
    new_terms = world.claims[terms_before:]
    assert [c.replica for c in new_terms] == ["new0#1"], (leader.name, new_terms)
    assert world.replicas[-3].claims(world.now)
