"""Who should own which shard: a pure function of the live members and the current holders,
computed alike by every replica that sees the same (no coordinator).

Sticky balanced rendezvous hashing:

1. Quotas. With N shards and M members, every member gets `N // M` shards and `N % M` of them
   one more: those first by a hash of their name. Quotas depend on the member set alone, never
   on who holds what: replicas that see the same members agree on them at every step of a
   hand-off, so a shard taken is never given back for a quota that moved meanwhile.
2. Keep. A member keeps the shards it holds, up to its quota (its best-scoring ones, a score
   being a hash of the shard and the member's name).
3. Fill. Every other shard (free, held by someone who is no longer a member, or above its
   holder's quota) goes to a member with room left, best-scoring (shard, member) pair first.

Properties (checked by tests/unit/test_shard_assignment.py and by the simulation):
- balance: every member's quota is N // M or N // M + 1, and the quotas add up to N;
- a fixed point: when the holders are the assignment, the assignment is the holders, so
  nothing moves while membership stays the same;
- a join moves only the shards the newcomer receives (its quota, at most ceil(N / M)); a
  leave moves only the leaver's shards (at most ceil(N / M) for the M members before), plus
  at most one more where a quota changes hands;
- with no holders it is plain balanced rendezvous hashing, the same on every replica.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence


@functools.lru_cache(maxsize=65536)
def score(shard: int, member: str) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(
    members: Iterable[str], shards: int, holders: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The desired owner of each shard ("" for all when there are no members).

    `holders[i]` is shard i's holder as observed ("" when free or unknown).
    """
    names = sorted(set(members))
    if not names:
        return ("",) * shards
    current = list(holders) if holders is not None else [""] * shards
    held: dict[str, list[int]] = {name: [] for name in names}
    for shard, holder in enumerate(current):
        if holder in held:
            held[holder].append(shard)
    base, extra = divmod(shards, len(names))
    ranked = sorted(names, key=lambda name: (score(-1, name), name))
    quota = {name: base + (1 if rank < extra else 0) for rank, name in enumerate(ranked)}
    owners = [""] * shards
    room: dict[str, int] = {}
    for name in names:
        keep = sorted(held[name], key=lambda shard: score(shard, name), reverse=True)
        for shard in keep[: quota[name]]:
            owners[shard] = name
        room[name] = quota[name] - min(len(keep), quota[name])
    open_shards = [shard for shard in range(shards) if not owners[shard]]
    if open_shards:
        pairs = sorted(
            (
                (score(shard, name), shard, name)
                for shard in open_shards
                for name in names
                if room[name]
            ),
            reverse=True,
        )
        left = len(open_shards)
        for _, shard, name in pairs:
            if owners[shard] or not room[name]:
                continue
            owners[shard] = name
            room[name] -= 1
            left -= 1
            if not left:
                break
    return tuple(owners)


def moves(before: Sequence[str], after: Sequence[str]) -> int:
    """How many shards have another owner in `after` than in `before`."""
    return sum(1 for a, b in zip(before, after, strict=True) if a != b)


def spread(owners: Sequence[str], members: Iterable[str]) -> int:
    """max - min of the shards each member owns (0 when there are no members)."""
    counts = {name: 0 for name in members}
    for owner in owners:
        if owner in counts:
            counts[owner] += 1
    return max(counts.values()) - min(counts.values()) if counts else 0
