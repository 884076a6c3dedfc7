"""The deterministic world of tests/sim/world.py, sharded: replicas run the real `ShardedCore`
(N shard elections + a member table) against N API-server-like Lease stores and a member store,
while they join, leave, crash, pause, flap their app's health and release shards.

Checked after every step (`ShardWorld.check_after_step`):
- never two owners of one shard at the same instant (a crashed replica's app keeps its claims
  until their valid_until);
- fencing tokens grow per shard;
- a replica writes only records naming itself (or nobody), releases a shard only after its app
  heard it no longer owns it, and sends at most 5 requests per retry period per shard.
Checked at the end (`simulate_shards`): once the faults stop and membership is stable, every
shard has an owner within a bound, owned counts differ by at most one, and then nothing moves.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sidecar.election import core
from sidecar.election.core import MAX_REQUESTS_PER_RETRY_PERIOD, Answer, Outcome, Purpose
from sidecar.election.record import LeaderRecord, VersionedRecord
from sidecar.shards import core as sharded
from sidecar.shards.assignment import spread
from sidecar.shards.core import ShardedCore
from tests.sim.world import DRIFT, EPOCH, TIMINGS, Store, Violation

SHARD_FAULTS = (
    "lost_answers",
    "lost_requests",
    "errors",
    "watch_lag",
    "watch_gaps",
    "pauses",
    "crashes",  # SIGKILL, restarted later with the same identity
    "joins",  # a new replica starts
    "leaves",  # a graceful shutdown (tells the app, releases, withdraws)
    "restarts",  # a graceful shutdown, then the same identity starts again
    "eligibility",  # the app's health flaps
    "releases",  # POST /shards/{i}/release
)

MakeSharded = Callable[[str, int, random.Random], ShardedCore]


class _Channel:
    """What a `Store` needs of its world, for one shard."""

    def __init__(self, world: ShardWorld, shard: int) -> None:
        self._world = world
        self._shard = shard

    @property
    def now(self) -> float:
        return self._world.now

    @property
    def rng(self) -> random.Random:
        return self._world.rng

    def notify(self, current: VersionedRecord | None) -> None:
        self._world.notify(self._shard, current)

    def break_watches(self) -> None:
        pass


@dataclass
class SReplica:
    world: ShardWorld
    identity: str
    incarnation: int
    rate: float
    offset: float
    core: ShardedCore
    wall_skew: float = 0.0
    alive: bool = True
    crashed: bool = False
    leaving: bool = False  # told to shut down
    paused_until: float = 0.0
    queue: deque[Any] = field(default_factory=deque)
    tick_generation: int = 0
    request_generation: dict[int, int] = field(default_factory=dict)
    watch_session: int = 0
    watch_last_delivery: float = 0.0
    sends: dict[int, deque[float]] = field(default_factory=dict)
    told_owner: dict[int, bool] = field(default_factory=dict)
    claimed_term: dict[int, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.identity}#{self.incarnation}"

    def local(self, true_time: float) -> float:
        return self.offset + self.rate * true_time

    def true(self, local_time: float) -> float:
        return (local_time - self.offset) / self.rate

    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.world.now + self.wall_skew)

    def owns(self, shard: int, true_time: float) -> bool:
        return self.core.cores[shard].is_leader(self.local(true_time))


@dataclass
class ShardClaim:
    replica: str
    shard: int
    token: int
    start: float


class ShardWorld:
    def __init__(
        self,
        seed: int,
        replicas: int | None = None,
        shards: int | None = None,
        fault_seconds: float = 8.0,
        faults: tuple[str, ...] | None = None,
        trace: bool = False,
        make_core: MakeSharded | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self.timings = TIMINGS
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.shards = shards if shards is not None else self.rng.choice((1, 2, 4, 5, 8, 12))
        count = replicas if replicas is not None else self.rng.randint(2, 5)
        self.stores = [Store(_Channel(self, i)) for i in range(self.shards)]  # type: ignore[arg-type]
        self.members: dict[str, LeaderRecord] = {}
        self.replicas: list[SReplica] = []
        self.claims: list[ShardClaim] = []
        self.trace_on = trace
        self.trace: list[str] = []
        self.fault_until = fault_seconds
        if faults is None:
            picked = self.rng.sample(SHARD_FAULTS, self.rng.randint(1, 4))
            self.faults = set(picked)
        else:
            self.faults = set(faults)
        self._make_core = make_core or (lambda ident, n, rng: ShardedCore(ident, n, TIMINGS, rng))
        self._incarnations: dict[str, int] = {}
        self._names = 0
        self.moves = 0  # ownership changes: a shard claimed by another identity than before
        self._last_owner: dict[int, str] = {}
        for _ in range(count):
            self.spawn(self.new_name(), at=self.rng.uniform(0, 0.5))
        self._plan_faults()

    # --------------------------------------------------------------- scheduling

    def new_name(self) -> str:
        self._names += 1
        return f"r{self._names - 1}"

    def at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, action))

    def log(self, text: str) -> None:
        if self.trace_on:
            self.trace.append(f"{self.now:9.4f} {text}")

    def faulty(self, name: str, probability: float) -> bool:
        return (
            name in self.faults and self.now < self.fault_until and self.rng.random() < probability
        )

    def run(self, until: float) -> None:
        while self._queue and self._queue[0][0] <= until:
            when, _, action = heapq.heappop(self._queue)
            self.now = when
            action()
        self.now = until

    # ----------------------------------------------------------------- replicas

    def spawn(self, identity: str, at: float) -> None:
        def start() -> None:
            incarnation = self._incarnations.get(identity, 0) + 1
            self._incarnations[identity] = incarnation
            rng = random.Random(self.rng.getrandbits(32))
            replica = SReplica(
                world=self,
                identity=identity,
                incarnation=incarnation,
                rate=1 + self.rng.uniform(-DRIFT, DRIFT),
                offset=self.rng.uniform(0, 1000),
                core=self._make_core(identity, self.shards, rng),
                wall_skew=self.rng.uniform(-30, 30),
            )
            self.replicas.append(replica)
            self.log(f"{replica.name} starts")
            self.deliver(replica, core.Start())
            self.connect_watch(replica)

        self.at(at, start)

    def live(self) -> list[SReplica]:
        return [r for r in self.replicas if r.alive]

    def deliver(self, replica: SReplica, event: Any) -> None:
        if not replica.alive:
            return
        replica.queue.append(event)
        if self.now < replica.paused_until:
            return
        self._drain(replica)

    def _drain(self, replica: SReplica) -> None:
        while replica.queue and replica.alive and self.now >= replica.paused_until:
            event = replica.queue.popleft()
            local = replica.local(self.now)
            actions = replica.core.step(event, local, replica.wall())
            if self.trace_on:
                self.log(f"{replica.name} <- {_short(event)} -> {[_short(a) for a in actions]}")
            for action in actions:
                self._perform(replica, action, local)
            self.check_after_step(replica)
        if replica.alive and not replica.queue:
            self._schedule_tick(replica)

    def _schedule_tick(self, replica: SReplica) -> None:
        replica.tick_generation += 1
        wake = replica.core.wake_at
        if wake is None:
            return
        generation = replica.tick_generation

        def fire() -> None:
            if replica.tick_generation == generation:
                self.deliver(replica, core.Tick())

        when = replica.true(wake)
        while replica.local(when) < wake:
            when = math.nextafter(when, math.inf)
        self.at(when, fire)

    def _perform(self, replica: SReplica, action: Any, local: float) -> None:
        match action:
            case sharded.ShardAction(shard, inner):
                self._perform_shard(replica, shard, inner, local)
            case sharded.Announce(record):
                self._member_write(replica, record)
            case sharded.Withdraw():
                self._member_write(replica, None)
            case sharded.Forget(identity):
                self._forget(identity)
            case sharded.AllDone():
                replica.alive = False
                self.log(f"{replica.name} stopped")

    def _perform_shard(self, replica: SReplica, shard: int, action: Any, local: float) -> None:
        match action:
            case core.Read() | core.Create() | core.Update():
                self._request(replica, shard, action, local)
            case core.RunHook(_, hook_id, deadline):
                delay = self.rng.expovariate(1 / 0.01)
                if self.faulty("pauses", 0.05):
                    delay = self.rng.uniform(0.5, 3.0)
                done_at = min(self.now + delay, replica.true(deadline))
                event = sharded.ShardEvent(shard, core.HookDone(hook_id))
                self.at(done_at, lambda: self.deliver(replica, event))
            case core.Publish(view):
                replica.told_owner[shard] = view.role is core.Role.LEADER

    # ------------------------------------------------------------------ members

    def _member_write(self, replica: SReplica, record: LeaderRecord | None) -> None:
        """Member records: unconditional writes of one's own record, after some latency."""
        if self.faulty("lost_requests", 0.03):
            return
        identity = replica.identity

        def apply() -> None:
            if record is None:
                self.members.pop(identity, None)
            else:
                self.members[identity] = record
            self.notify_members()

        self.at(self.now + self._latency(), apply)

    def _forget(self, identity: str) -> None:
        def apply() -> None:
            if self.members.pop(identity, None) is not None:
                self.notify_members()

        self.at(self.now + self._latency(), apply)

    def notify_members(self) -> None:
        snapshot = dict(self.members)
        for replica in self.live():
            if self.faulty("watch_gaps", 0.1):
                continue
            when = max(self.now + self._latency(), replica.watch_last_delivery)
            if self.faulty("watch_lag", 0.3):
                when = self.now + self.rng.uniform(0, 1.5)
            session = replica.watch_session
            event = sharded.MembersSeen(snapshot)
            self.at(when, functools.partial(self._arrive, replica, session, event))

    # ------------------------------------------------------------------ network

    def _request(self, replica: SReplica, shard: int, action: Any, local: float) -> None:
        sends = replica.sends.setdefault(shard, deque())
        sends.append(local)
        window = self.timings.retry_period
        while sends and sends[0] <= local - window:
            sends.popleft()
        if len(sends) > MAX_REQUESTS_PER_RETRY_PERIOD:
            self.fail(f"{replica.name} sent {len(sends)} requests for shard {shard} in one period")
        if isinstance(action, core.Create | core.Update):
            holder = action.record.holder_identity
            if holder not in ("", replica.identity):
                self.fail(f"{replica.name} wrote a record naming {holder!r} on shard {shard}")
            if action.purpose is Purpose.RELEASE and replica.told_owner.get(shard):
                self.fail(f"{replica.name} released shard {shard} before telling its app")
        generation = replica.request_generation.get(shard, 0) + 1
        replica.request_generation[shard] = generation
        answered = [False]

        def answer(result: Answer) -> None:
            if answered[0] or replica.request_generation.get(shard) != generation:
                return
            answered[0] = True
            self.deliver(replica, sharded.ShardEvent(shard, result))

        self.at(
            replica.true(local + max(action.timeout, 0.0)),
            lambda: answer(Answer(Outcome.UNKNOWN, error="timeout")),
        )
        if self.faulty("lost_requests", 0.03):
            return

        def arrive() -> None:
            result = self._serve(replica, shard, action)
            if result is None:
                return
            back = self._latency()
            if self.faulty("lost_answers", 0.05):
                back += self.rng.uniform(1, 4)
            self.at(self.now + back, lambda: answer(result))

        self.at(self.now + self._latency(), arrive)

    def _latency(self) -> float:
        base = 0.0002 + min(self.rng.expovariate(1 / 0.003), 0.1)
        if self.faulty("errors", 0.05) or self.faulty("lost_answers", 0.05):
            base += self.rng.uniform(0.05, 1.5)
        return base

    def _serve(self, replica: SReplica, shard: int, action: Any) -> Answer | None:
        store = self.stores[shard]
        if self.faulty("errors", 0.06):
            kind = self.rng.choice(("503", "429", "applied-500"))
            if kind != "applied-500":
                return Answer(Outcome.UNKNOWN, error=kind, retry_after=self.rng.choice((None, 0.5)))
            self._apply(replica, store, action)
            return Answer(Outcome.UNKNOWN, error="500 after applying")
        outcome, record = self._apply(replica, store, action)
        if self.faulty("lost_answers", 0.05):
            return None
        return Answer(outcome, record)

    def _apply(
        self, replica: SReplica, store: Store, action: Any
    ) -> tuple[Outcome, VersionedRecord | None]:
        match action:
            case core.Read():
                return Outcome.OK, store.get()
            case core.Create(record):
                return store.create(replica.name, record)
            case core.Update(record, version):
                return store.update(replica.name, record, version)
        raise AssertionError(action)

    # ------------------------------------------------------------------ watches

    def connect_watch(self, replica: SReplica) -> None:
        """One session stands for the replica's shard watches and its member watch."""
        replica.watch_session += 1
        session = replica.watch_session

        def opened() -> None:
            if replica.watch_session != session or not replica.alive:
                return
            replica.watch_last_delivery = self.now
            for i, store in enumerate(self.stores):
                self.deliver(replica, sharded.ShardEvent(i, core.WatchHealth(True)))
                self.deliver(replica, sharded.ShardEvent(i, core.WatchEvent(store.get())))
            self.deliver(replica, sharded.MembersSeen(dict(self.members)))

        self.at(self.now + self._latency(), opened)

    def break_watch(self, replica: SReplica) -> None:
        replica.watch_session += 1
        for i in range(self.shards):
            self.deliver(replica, sharded.ShardEvent(i, core.WatchHealth(False, "watch broke")))
        delay = self.rng.uniform(0.1, self.timings.retry_period * 1.5)
        self.at(self.now + delay, lambda: self.connect_watch(replica))

    def notify(self, shard: int, current: VersionedRecord | None) -> None:
        for replica in self.live():
            if self.faulty("watch_gaps", 0.1):
                continue
            session = replica.watch_session
            when = max(self.now + self._latency(), replica.watch_last_delivery)
            if self.faulty("watch_lag", 0.3):
                when = self.now + self.rng.uniform(0, 1.5)
            else:
                replica.watch_last_delivery = when
            event = sharded.ShardEvent(shard, core.WatchEvent(current))
            self.at(when, functools.partial(self._arrive, replica, session, event))

    def _arrive(self, replica: SReplica, session: int, event: Any) -> None:
        if replica.watch_session == session:
            self.deliver(replica, event)

    # ------------------------------------------------------------------- faults

    def _plan_faults(self) -> None:
        t = 0.0
        while True:
            t += 0.05 + self.rng.expovariate(1 / 0.7)
            if t >= self.fault_until:
                break
            self.at(t, self._random_fault)

    def _random_fault(self) -> None:
        rng = self.rng
        live = self.live()
        choice = rng.choice(sorted(self.faults)) if self.faults else None
        if choice == "watch_gaps" and live:
            target = rng.choice(live)
            self.log(f"fault: {target.name} watches break")
            self.break_watch(target)
        elif choice == "pauses" and live:
            target = rng.choice(live)
            seconds = rng.uniform(0.2, 5.0)
            self.log(f"fault: {target.name} paused {seconds:.2f}s")
            target.paused_until = self.now + seconds
            self.at(target.paused_until, lambda: self._drain(target))
        elif choice == "crashes" and live:
            target = rng.choice(live)
            self.log(f"fault: {target.name} crashes")
            target.alive = False
            target.crashed = True
            if rng.random() < 0.7 or len(live) < 3:
                self.spawn(
                    target.identity, at=min(self.now + rng.uniform(0.1, 4), self.fault_until)
                )
        elif choice == "joins" and len(live) < 7:
            name = self.new_name()
            self.log(f"fault: {name} joins")
            self.spawn(name, at=self.now)
        elif choice in ("leaves", "restarts") and len([r for r in live if not r.leaving]) > 1:
            target = rng.choice([r for r in live if not r.leaving])
            self.log(f"fault: {target.name} shuts down")
            target.leaving = True
            self.deliver(target, core.Shutdown())
            if choice == "restarts":
                self.spawn(
                    target.identity, at=min(self.now + rng.uniform(0.2, 3), self.fault_until)
                )
        elif choice == "eligibility" and live:
            target = rng.choice(live)
            self.deliver(target, sharded.SetHealthy(False, "unhealthy"))
            back = min(self.now + rng.uniform(0.1, 3), self.fault_until)
            self.at(back, lambda: self.deliver(target, sharded.SetHealthy(True, "healthy")))
        elif choice == "releases" and live:
            target = rng.choice(live)
            shard = rng.randrange(self.shards)
            self.log(f"fault: {target.name} releases shard {shard}")
            self.deliver(target, sharded.ReleaseShard(shard))

    # --------------------------------------------------------------- invariants

    def fail(self, message: str) -> None:
        trace = "\n".join(["", "trace (true time, replica <- event -> actions):", *self.trace])
        raise Violation(
            f"shard seed {self.seed}: t={self.now:.4f}: {message}"
            + (trace if self.trace_on else "")
        )

    def owners(self, shard: int) -> list[SReplica]:
        return [r for r in self.replicas if (r.alive or r.crashed) and r.owns(shard, self.now)]

    def check_after_step(self, replica: SReplica) -> None:
        # A claim starts only in a step of its replica and ends only as time passes: two
        # overlapping claims are caught at the step where the later one starts.
        for shard in range(self.shards):
            if not replica.owns(shard, self.now):
                continue
            owners = self.owners(shard)
            if len(owners) > 1:
                self.fail(f"two owners of shard {shard}: " + ", ".join(r.name for r in owners))
            term = replica.core.cores[shard]._term
            if replica.claimed_term.get(shard) == term:
                continue
            replica.claimed_term[shard] = term
            assert term is not None
            token = term.transitions
            for earlier in self.claims:
                if earlier.shard == shard and token <= earlier.token:
                    self.fail(
                        f"{replica.name} owns shard {shard} with fencing token {token}, not "
                        f"above {earlier.replica}'s {earlier.token}"
                    )
            self.claims.append(ShardClaim(replica.name, shard, token, self.now))
            if self._last_owner.get(shard, replica.identity) != replica.identity:
                self.moves += 1
            self._last_owner[shard] = replica.identity
            self.log(f"{replica.name} OWNS shard {shard} token={token}")

    def ownership(self) -> tuple[str, ...]:
        """Each shard's owning identity now ("" when none)."""
        result = []
        for shard in range(self.shards):
            owners = self.owners(shard)
            result.append(owners[0].identity if owners and owners[0].alive else "")
        return tuple(result)


def _short(item: object) -> str:
    text = repr(item)
    return text if len(text) < 160 else text[:157] + "..."


@dataclass(frozen=True)
class ShardResult:
    seed: int
    faults: tuple[str, ...]
    shards: int
    replicas: int
    claims: int
    moves: int
    settled_after: float  # seconds after the faults stopped until balanced and all owned
    trace: list[str]


# Once the faults stop and membership is stable: a crashed member's record and its shard Leases
# expire (L), a holder still in its creation wait lets its record lapse (L + L), a request sent
# before may still time out; all on the slowest clock.
def settle_bound() -> float:
    t = TIMINGS
    request_timeout = max(t.renew_deadline, 1.0)
    return (2 * t.lease_duration + 2 * 1.2 * t.retry_period) / (1 - DRIFT) + request_timeout + 1.0


def simulate_shards(
    seed: int,
    fault_seconds: float = 8.0,
    faults: tuple[str, ...] | None = None,
    trace: bool = False,
    make_core: MakeSharded | None = None,
    replicas: int | None = None,
    shards: int | None = None,
) -> ShardResult:
    world = ShardWorld(seed, replicas, shards, fault_seconds, faults, trace, make_core)
    world.run(fault_seconds)
    if not [r for r in world.live() if not r.leaving]:
        world.spawn(world.new_name(), at=world.now)  # everyone left: one more replica starts
        world.run(world.now + 0.001)
    for replica in world.live():  # pauses end, apps get healthy, watches come back
        replica.paused_until = min(replica.paused_until, world.now)
        world.deliver(replica, sharded.SetHealthy(True, "healthy"))
        world.break_watch(replica)
    bound = settle_bound()
    settled: float | None = None
    step = TIMINGS.retry_period / 4
    # Requests sent while the faults ran may still time out (and a renewal with them): the
    # settling is judged once they are over.
    t = fault_seconds + max(TIMINGS.renew_deadline, 1.0) + TIMINGS.retry_period
    world.run(t)
    while t < fault_seconds + bound:
        t += step
        world.run(t)
        owners = world.ownership()
        members = [r.identity for r in world.live()]
        if all(owners) and spread(owners, members) <= 1:
            settled = world.now - fault_seconds
            break
    if settled is None:
        owners = world.ownership()
        members = [r.identity for r in world.live()]
        world.fail(
            f"not settled {bound:.2f}s after the faults stopped: owners {owners}, "
            f"members {sorted(members)}"
        )
    assert settled is not None
    # Stable: nothing moves any more.
    before = world.ownership()
    claims = len(world.claims)
    world.run(world.now + 3 * TIMINGS.lease_duration)
    after = world.ownership()
    if after != before or len(world.claims) != claims:
        world.fail(f"ownership kept moving after it settled: {before} -> {after}")
    return ShardResult(
        seed,
        tuple(sorted(world.faults)),
        world.shards,
        len(world.live()),
        len(world.claims),
        world.moves,
        settled,
        world.trace,
    )


def shard_seeds(
    first: int, count: int, make_core: MakeSharded | None = None, stop_at_first: bool = False
) -> tuple[int, list[str], list[ShardResult]]:
    """Run seeds [first, first + count); (seeds run, violations, results)."""
    violations: list[str] = []
    results: list[ShardResult] = []
    ran = 0
    for seed in range(first, first + count):
        ran += 1
        try:
            results.append(simulate_shards(seed, make_core=make_core))
        except Violation as exc:
            violations.append(str(exc))
            if stop_at_first:
                break
    return ran, violations, results
