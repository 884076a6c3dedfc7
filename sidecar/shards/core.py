"""Shard ownership as a pure state machine: N shard elections and a member table, no I/O.

`ShardedCore(identity, shards, timings)` runs one `ElectionCore` per shard, each with exactly
the single election's rules (its own Lease, observed-time expiry, renew deadline, release,
fencing token), and decides only one thing on top of them: for which shards this replica is
*eligible*. That is the whole of sharding, so the election core's safety argument holds per
shard as it is (see sidecar/election/core.py): a replica acquires a shard only when that
shard's Lease is free or expired, and a holder that should no longer own a shard is made
ineligible, so its core tells the app ("not leader", the hook) and then releases. Nothing here
ever writes a shard record, fakes an observation or shortens a wait: assignment changes who
*wants* a shard, never who may take it.

Membership. Each replica announces itself with a small member record of its own (a Lease per
replica in Kubernetes, a file locally), renewed every `lease_duration / 3` with
`leaseDurationSeconds = lease_duration`, and withdrawn (released) when it shuts down or its app
is unhealthy. Members are judged like leases, by observed time: a member whose record did not
change for its `leaseDurationSeconds` on our clock is gone. A replica counts itself a member
while it announces itself.

Assignment (sidecar/shards/assignment.py): from the live members and the holders this replica
observes, every replica computes the same desired owner per shard, balanced within one, sticky
to the current holders. A replica is eligible for shard i when it is healthy, not stopping, and
either the desired owner of i, or i has had no holder for a while as seen here: two retry
periods for the next member in i's rendezvous order, two more for each member after it
(liveness: a desired owner that does not take its shard -- it released it on request and sits
it out, its view differs, it is stuck -- does not leave the shard unowned; balance moves it
later if it must).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sidecar.election import core
from sidecar.election.core import ElectionCore, Timings
from sidecar.election.record import LeaderRecord
from sidecar.shards.assignment import assign, score

MEMBER_RENEWALS_PER_DURATION = 3
FORGET_AFTER = 10  # lease durations of silence before a member record is deleted
ORPHAN_PERIODS = 2  # retry periods a free shard waits for its desired owner, per rank

MakeCore = Callable[[str, Timings, random.Random], ElectionCore]


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class ShardEvent:
    """An election event for one shard's core (watch event, answer, hook done, ...)."""

    shard: int
    event: core.Event


@dataclass(frozen=True, slots=True)
class MembersSeen:
    """Every member record as the backend shows it now, by identity (a full snapshot)."""

    records: Mapping[str, LeaderRecord]


@dataclass(frozen=True, slots=True)
class SetHealthy:
    healthy: bool
    app_health: str | None = None


@dataclass(frozen=True, slots=True)
class ReleaseShard:
    """Give up one shard now (the API's POST /shards/{i}/release): its core resigns."""

    shard: int


ShardedEvent = (
    core.Start | core.Tick | core.Shutdown | ShardEvent | MembersSeen | SetHealthy | ReleaseShard
)


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class ShardAction:
    shard: int
    action: core.Action


@dataclass(frozen=True, slots=True)
class Announce:
    """Write this replica's member record (create it, or update whatever version is there)."""

    record: LeaderRecord


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Remove this replica's member record (delete it; release it if that fails)."""


@dataclass(frozen=True, slots=True)
class Forget:
    """Delete the member record of `identity`: it has not changed for FORGET_AFTER of its
    durations (a replica killed without a goodbye, e.g. a SIGKILLed pod of a finished rollout).
    Only housekeeping: a member that was only silent announces itself again."""

    identity: str


@dataclass(frozen=True, slots=True)
class AllDone:
    """Shutdown finished on every shard."""


ShardedAction = ShardAction | Announce | Withdraw | Forget | AllDone


@dataclass(frozen=True, slots=True)
class ShardState:
    shard: int
    holder: str  # as observed ("" free or unknown)
    desired: str  # the assignment's owner ("" when there are no members)
    owned: bool  # this replica may act on it now
    view: core.View


# --------------------------------------------------------------------------------- core


class ShardedCore:
    def __init__(
        self,
        identity: str,
        shards: int,
        timings: Timings,
        rng: random.Random | None = None,
        make_core: MakeCore | None = None,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self.identity = identity
        self.shards = shards
        self.timings = timings
        rng = rng or random.Random()
        make = make_core or (lambda ident, t, r: ElectionCore(ident, t, r))
        self.cores = [
            make(identity, timings, random.Random(rng.getrandbits(32))) for _ in range(shards)
        ]
        self._eligible = [False] * shards  # what each core was last told
        self._free_since: list[float | None] = [None] * shards
        self._members: dict[str, tuple[LeaderRecord, float]] = {}  # record, local time changed
        self._healthy = True
        self._app_health: str | None = None
        self._started = False
        self._shutting_down = False
        self._announced = False  # counts itself a member
        self._members_ready = False  # saw its own member record: the member view is complete
        self._forgotten: set[str] = set()  # member records we asked to delete
        self._orphans: set[int] = set()  # shards taken while not their desired owner
        self._next_announce = 0.0
        self._announce_start: datetime | None = None
        self._last_renew: datetime | None = None
        self._done = False
        self._desired: tuple[str, ...] = ("",) * shards
        self._holders: tuple[str, ...] = ("",) * shards
        self._assigned_from: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._wake_at: float | None = None

    # ------------------------------------------------------------------- public

    @property
    def wake_at(self) -> float | None:
        return self._wake_at

    @property
    def done(self) -> bool:
        return self._done

    @property
    def member_duration(self) -> float:
        return self.timings.lease_duration

    @property
    def member_period(self) -> float:
        return self.timings.lease_duration / MEMBER_RENEWALS_PER_DURATION

    def members(self, now: float) -> list[str]:
        """The live members as this replica sees them, sorted."""
        live = {
            name
            for name, (record, changed_at) in self._members.items()
            if record.holder_identity
            and name != self.identity
            and now < changed_at + _duration(record, self.timings)
        }
        if self._announced:
            live.add(self.identity)
        return sorted(live)

    def owned(self, now: float) -> list[int]:
        return [i for i, c in enumerate(self.cores) if c.is_leader(now)]

    def states(self, now: float) -> list[ShardState]:
        return [
            ShardState(i, self._holders[i], self._desired[i], c.is_leader(now), c.view(now))
            for i, c in enumerate(self.cores)
        ]

    @property
    def desired(self) -> tuple[str, ...]:
        """Each shard's owner by the assignment, as of the last step."""
        return self._desired

    @property
    def live_members(self) -> tuple[str, ...]:
        """The live members as of the last step (sorted)."""
        return self._assigned_from[0] if self._assigned_from else ()

    @property
    def holders(self) -> tuple[str, ...]:
        """Each shard's holder as observed, as of the last step ("" free or unknown)."""
        return self._holders

    def step(self, event: ShardedEvent, now: float, wall: datetime) -> list[ShardedAction]:
        out: list[ShardedAction] = []
        if self._done:
            if isinstance(event, ShardEvent):
                self._step_core(event.shard, event.event, now, wall, out)
            return out
        match event:
            case core.Start():
                self._started = True
                self._announced = self._healthy
                for i in range(self.shards):
                    # Nobody campaigns before the member view is in (see _rebalance).
                    self._step_core(i, core.SetEligible(False, self._app_health), now, wall, out)
                    self._step_core(i, core.Start(), now, wall, out)
            case core.Tick():
                for i, c in enumerate(self.cores):
                    if c.wake_at is not None and c.wake_at <= now:
                        self._step_core(i, core.Tick(), now, wall, out)
            case ShardEvent(shard, inner):
                self._step_core(shard, inner, now, wall, out)
            case MembersSeen(records):
                self._see_members(records, now)
            case SetHealthy(healthy, app_health):
                self._healthy = healthy
                self._app_health = app_health
                if healthy and self._started and not self._shutting_down:
                    if not self._announced:
                        self._announced = True
                        self._next_announce = now
                elif self._announced:
                    self._announced = False
                    out.append(Withdraw())
            case ReleaseShard(shard):
                self._step_core(shard, core.Resign(), now, wall, out)
            case core.Shutdown():
                if not self._shutting_down:
                    self._shutting_down = True
                    if self._announced:
                        self._announced = False
                        out.append(Withdraw())
                    for i in range(self.shards):
                        self._step_core(i, core.Shutdown(), now, wall, out)
        if self._started:
            self._rebalance(now, wall, out)
            self._maybe_announce(now, wall, out)
            self._forget_the_long_gone(now, out)
        if self._shutting_down and not self._done and all(c.done for c in self.cores):
            self._done = True
            out.append(AllDone())
        self._wake_at = self._next_wake(now)
        return out

    # ------------------------------------------------------------------ internals

    def _step_core(
        self, shard: int, event: core.Event, now: float, wall: datetime, out: list[ShardedAction]
    ) -> None:
        if not 0 <= shard < self.shards:
            return
        for action in self.cores[shard].step(event, now, wall):
            out.append(ShardAction(shard, action))

    def _see_members(self, records: Mapping[str, LeaderRecord], now: float) -> None:
        mine = records.get(self.identity)
        if mine is not None and mine.holder_identity == self.identity:
            # Our own announcement is visible: so is every replica that announced before us,
            # and we stop believing we are alone (which would make us grab every shard).
            self._members_ready = True
        seen: dict[str, tuple[LeaderRecord, float]] = {}
        for name, record in records.items():
            previous = self._members.get(name)
            if previous is not None and previous[0] == record:
                seen[name] = previous  # unchanged: its expiry count goes on
            else:
                seen[name] = (record, now)
                self._forgotten.discard(name)
        self._members = seen

    def _rebalance(self, now: float, wall: datetime, out: list[ShardedAction]) -> None:
        holders = tuple(c.holder(now) for c in self.cores)
        members = tuple(self.members(now))
        if (members, holders) != self._assigned_from:
            self._assigned_from = (members, holders)
            self._desired = assign(members, self.shards, holders)
        self._holders = holders
        desired = self._desired
        may = self._may_campaign()
        keep, shed = self._swaps(holders, desired)
        for i in range(self.shards):
            if holders[i]:
                self._free_since[i] = None
            elif self._free_since[i] is None:
                self._free_since[i] = now
            free_since = self._free_since[i]
            orphaned = free_since is not None and now >= free_since + self._grace(i, members)
            if orphaned and desired[i] != self.identity and may:
                self._orphans.add(i)
            eligible = may and (
                (desired[i] == self.identity and i not in shed) or orphaned or i in keep
            )
            if eligible != self._eligible[i]:
                self._eligible[i] = eligible
                if not self._healthy:
                    reason = "the app is unhealthy"
                elif self._shutting_down:
                    reason = "shutdown"
                else:
                    reason = f"shard assigned to {desired[i] or 'nobody'}"
                change = core.SetEligible(eligible, self._app_health, reason)
                self._step_core(i, change, now, wall, out)

    def _swaps(
        self, holders: tuple[str, ...], desired: tuple[str, ...]
    ) -> tuple[set[int], set[int]]:
        """Shards we took as orphans and the assignment would have us give back at once (we
        are over quota and they score lowest): keep each, and give up instead the lowest-scoring
        shard the assignment lets us keep. Once that one is released we are within quota and
        the assignment keeps what we hold, so nobody needs to know which one we chose; giving
        the orphan back instead would bounce it (its desired owner may be sitting it out after
        a release on request)."""
        me = self.identity
        self._orphans = {i for i in self._orphans if holders[i] == me and desired[i] != me}
        keep: set[int] = set()
        shed: set[int] = set()
        if not self._orphans:
            return keep, shed
        spare = sorted(
            (j for j in range(self.shards) if holders[j] == me and desired[j] == me),
            key=lambda j: score(j, me),
        )
        for i in sorted(self._orphans):
            if not spare:
                break
            keep.add(i)
            shed.add(spare.pop(0))
        return keep, shed

    def _grace(self, shard: int, members: tuple[str, ...]) -> float:
        """How long a free shard waits for its desired owner before this replica may take it:
        two retry periods for the next member in the shard's rendezvous order, two more for
        each one after (a desired owner that released the shard on request sits it out, one
        whose view differs does not see it as its own, one that is stuck does nothing)."""
        others = sorted(
            (name for name in members if name != self._desired[shard]),
            key=lambda name: score(shard, name),
            reverse=True,
        )
        rank = others.index(self.identity) if self.identity in others else len(others)
        return ORPHAN_PERIODS * self.timings.retry_period * (rank + 1)

    def _forget_the_long_gone(self, now: float, out: list[ShardedAction]) -> None:
        if not self._may_campaign():
            return
        for name, (record, changed_at) in self._members.items():
            if name == self.identity or name in self._forgotten:
                continue
            if now >= changed_at + FORGET_AFTER * _duration(record, self.timings):
                self._forgotten.add(name)
                out.append(Forget(name))

    def _may_campaign(self) -> bool:
        return self._announced and self._members_ready and self._healthy and not self._shutting_down

    def _maybe_announce(self, now: float, wall: datetime, out: list[ShardedAction]) -> None:
        if not self._announced or now < self._next_announce:
            return
        if self._announce_start is None:
            self._announce_start = wall
        renew = wall
        if self._last_renew is not None and renew <= self._last_renew:
            renew = self._last_renew + timedelta(microseconds=1)  # always a visible change
        self._last_renew = renew
        record = LeaderRecord(
            holder_identity=self.identity,
            lease_duration_seconds=round(self.member_duration),
            acquire_time=self._announce_start,
            renew_time=renew,
            lease_transitions=0,
        )
        self._next_announce = now + self.member_period
        out.append(Announce(record))

    def _next_wake(self, now: float) -> float | None:
        times = [c.wake_at for c in self.cores if c.wake_at is not None]
        if self._announced:
            times.append(self._next_announce)
        for name, (record, changed_at) in self._members.items():
            if record.holder_identity and name != self.identity:
                times.append(changed_at + _duration(record, self.timings))
            if name != self.identity and name not in self._forgotten:
                times.append(changed_at + FORGET_AFTER * _duration(record, self.timings))
        if self._may_campaign():
            members = self.live_members
            for i, since in enumerate(self._free_since):
                if since is not None and not self._eligible[i]:
                    times.append(since + self._grace(i, members))
        future = [t for t in times if t > now]
        return min(future) if future else None


def _duration(record: LeaderRecord, timings: Timings) -> float:
    seconds = record.lease_duration_seconds
    return float(seconds) if seconds > 0 else timings.lease_duration
