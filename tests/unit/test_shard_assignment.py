"""The shard assignment: the same on every replica, balanced within one, a fixed point, and
few moves on a join or a leave (also along the way, one release or acquisition at a time)."""

from __future__ import annotations

import math
import random

import pytest

from sidecar.shards.assignment import assign, moves, spread


def _settle(
    members: set[str], shards: int, holders: list[str], rng: random.Random
) -> tuple[list[str], int]:
    """Play the hand-off one step at a time, in a random order, as replicas would: a member
    holding a shard assigned elsewhere releases it; a free (or lapsed) shard is taken by its
    assigned owner. Returns the holders at the fixed point and the ownership changes."""
    holders = list(holders)
    changes = 0
    for _ in range(10 * shards + 50):
        target = assign(members, shards, holders)
        todo = [i for i in range(shards) if holders[i] != target[i]]
        if not todo:
            return holders, changes
        i = rng.choice(todo)
        if holders[i] in members:
            holders[i] = ""
        else:
            changes += 1
            holders[i] = target[i]
    raise AssertionError("the hand-off did not converge")


def test_every_replica_computes_the_same_owners_whatever_the_order_of_members() -> None:
    members = ["pod-c", "pod-a", "pod-b"]
    assert assign(members, 16) == assign(reversed(members), 16) == assign(set(members), 16)


def test_no_members_no_owners() -> None:
    assert assign([], 4) == ("", "", "", "")


def test_holders_who_left_are_replaced() -> None:
    owners = assign(["a", "b"], 4, ["gone", "gone", "a", "b"])
    assert "gone" not in owners and spread(owners, ["a", "b"]) == 0


@pytest.mark.parametrize("seed", range(40))
def test_balanced_fixed_point_and_bounded_moves_on_one_join_or_leave(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        shards = rng.choice((1, 2, 3, 5, 7, 8, 16, 32, 33, 64))
        members = {f"pod-{rng.getrandbits(24):06x}" for _ in range(rng.randint(1, 9))}
        settled, _ = _settle(members, shards, [""] * shards, rng)
        assert spread(settled, members) <= 1
        assert list(assign(members, shards, settled)) == settled  # nothing moves
        if rng.random() < 0.5 or len(members) == 1:
            changed = members | {f"new-{rng.getrandbits(24):06x}"}
        else:
            changed = members - {rng.choice(sorted(members))}
        after, changes = _settle(changed, shards, settled, rng)
        assert spread(after, changed) <= 1
        assert changes == moves(settled, after)
        bound = math.ceil(shards / max(len(members), len(changed))) + 1
        assert changes <= bound, (shards, len(members), len(changed), changes)
