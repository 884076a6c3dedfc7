"""A deterministic world for the election core: virtual clocks, a Lease store with API-server
semantics, a lossy network, watches that lag and lie, foreign writers -- all driven by one seed.

`simulate(seed)` runs N replicas of the real `ElectionCore` through a random fault mix and checks
the invariants after every step; a violation raises `Violation` with a trace that the same seed
replays exactly. Nothing here reads a real clock or does I/O.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sidecar.election import core
from sidecar.election.core import (
    MAX_REQUESTS_PER_RETRY_PERIOD,
    Answer,
    ElectionCore,
    Event,
    Outcome,
    Purpose,
    Timings,
)
from sidecar.election.record import LeaderRecord, VersionedRecord

TIMINGS = Timings(lease_duration=3.0, renew_deadline=2.0, retry_period=0.4)
# The clock-rate bound the core's safety argument needs: D (1 + r) < L (1 - r), i.e. r < 0.2
# for these timings. Replicas drift by up to DRIFT, inside that bound.
DRIFT = 0.1
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
FAULTS = (
    "lost_answers",  # writes applied, answer lost or late (past the timeout)
    "lost_requests",  # requests that never arrive
    "errors",  # 5xx / 429 with Retry-After / malformed answers (applied or not)
    "watch_lag",  # watch events delayed, duplicated, reordered, stale re-deliveries
    "watch_gaps",  # events dropped, silences, disconnects, 410 Gone
    "deletes",  # the Lease deleted, with or without a watch event
    "rewinds",  # an etcd restore: versions start again lower
    "foreign",  # a client-go-shaped elector and metadata writers on the same Lease
    "storms",  # bursts of metadata-only writes: 409s for everybody
    "pauses",  # a replica stops for seconds (GC, SIGSTOP)
    "crashes",  # SIGKILL, then a restart with the same identity
    "twins",  # a second process with an existing identity
    "resigns",  # resign and graceful shutdown (and restart)
    "eligibility",  # the app's health flaps
    "rollouts",  # replicas learn a newer revision is ready (and forget it)
)


class Violation(AssertionError):
    pass


# ------------------------------------------------------------------------------- the store


@dataclass
class Stored:
    version: str
    record: LeaderRecord
    labels: int = 0  # stands for metadata others change (a new version, same record)


class Store:
    """One Lease: compare-and-swap on opaque versions, watchers told of each change."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.obj: Stored | None = None
        self._next = 100
        self._used: set[int] = set()
        self.writes: list[tuple[float, str, LeaderRecord]] = []  # (true time, writer, record)
        self.incarnation = 0  # grows with every create: one Lease object's life
        self.term_incarnation: dict[tuple[str, Any, int], int] = {}

    def _version(self) -> str:
        while self._next in self._used:
            self._next += 1
        self._used.add(self._next)
        self._next += 1
        return str(self._next - 1)

    def rewind(self) -> None:
        """An etcd restore: later versions are numerically lower than earlier ones."""
        self._next = max(1, self._next - self.world.rng.randint(20, 80))
        if self.obj is not None:
            self.obj = Stored(self._version(), self.obj.record, self.obj.labels)
        self.world.break_watches()

    def get(self) -> VersionedRecord | None:
        return VersionedRecord(self.obj.record, self.obj.version) if self.obj else None

    def create(self, writer: str, record: LeaderRecord) -> tuple[Outcome, VersionedRecord | None]:
        if self.obj is not None:
            return Outcome.CONFLICT, None
        self.incarnation += 1
        return Outcome.OK, self._put(writer, record, 0)

    def update(
        self, writer: str, record: LeaderRecord, version: str
    ) -> tuple[Outcome, VersionedRecord | None]:
        if self.obj is None:
            return Outcome.NOT_FOUND, None
        if self.obj.version != version:
            return Outcome.CONFLICT, None
        return Outcome.OK, self._put(writer, record, self.obj.labels)

    def touch(self) -> None:
        """Someone changes a label: a new version, the same record."""
        if self.obj is not None:
            self.obj = Stored(self._version(), self.obj.record, self.obj.labels + 1)
            self.world.notify(self.get())

    def delete(self, tell_watchers: bool) -> None:
        if self.obj is not None:
            self.obj = None
            self._version()
            if tell_watchers:
                self.world.notify(None)

    def _put(self, writer: str, record: LeaderRecord, labels: int) -> VersionedRecord:
        self.obj = Stored(self._version(), record, labels)
        self.writes.append((self.world.now, writer, record))
        term = (record.holder_identity, record.acquire_time, record.lease_transitions)
        self.term_incarnation.setdefault(term, self.incarnation)
        result = self.get()
        self.world.notify(result)
        assert result is not None
        return result


# ----------------------------------------------------------------------------- replicas


@dataclass
class Claim:
    replica: str  # the process (identity#incarnation)
    token: int
    start: float  # true time
    lease: int  # which Lease object (a deleted one is gone with its history)


@dataclass
class Replica:
    """One sidecar process: the real core, a virtual clock, and a driver like elector.py's."""

    world: World
    identity: str
    incarnation: int
    rate: float
    offset: float
    core: ElectionCore
    wall_skew: float = 0.0
    alive: bool = True  # False after a crash or a finished shutdown
    crashed: bool = False
    paused_until: float = 0.0
    queue: deque[Event] = field(default_factory=deque)
    tick_generation: int = 0
    request_generation: int = 0
    watch_session: int = 0
    watch_last_delivery: float = 0.0
    sends: deque[float] = field(default_factory=deque)  # local times of requests sent
    claimed_term: Any = None
    told_leader: bool = False  # what the app was last told

    @property
    def name(self) -> str:
        return f"{self.identity}#{self.incarnation}"

    def local(self, true_time: float) -> float:
        return self.offset + self.rate * true_time

    def true(self, local_time: float) -> float:
        return (local_time - self.offset) / self.rate

    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.world.now + self.wall_skew)

    def claims(self, true_time: float) -> bool:
        """What its app may believe at `true_time`: a crashed sidecar's app still holds its
        last message, so its claim runs to the last valid_until."""
        return self.core.is_leader(self.local(true_time))


class World:
    def __init__(
        self,
        seed: int,
        replicas: int = 3,
        fault_seconds: float = 8.0,
        faults: tuple[str, ...] | None = None,
        rng: random.Random | None = None,
        trace: bool = False,
        make_core: Callable[[str, random.Random], ElectionCore] | None = None,
    ) -> None:
        self.seed = seed
        self.rng = rng or random.Random(seed)
        self.now = 0.0
        self.timings = TIMINGS
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.store = Store(self)
        self.replicas: list[Replica] = []
        self.claims: list[Claim] = []
        self.trace_on = trace
        self.trace: list[str] = []
        self.fault_until = fault_seconds
        count = self.rng.randint(1, 4) if faults is None else 0
        self.faults = set(faults) if faults is not None else set(self.rng.sample(FAULTS, count))
        self._make_core = make_core or (lambda ident, rng: ElectionCore(ident, TIMINGS, rng))
        self._incarnations: dict[str, int] = {}
        self.quiet_leader_at: float | None = None
        for i in range(replicas):
            self.spawn(f"r{i}", at=self.rng.uniform(0, 0.5))
        self._plan_faults()

    # ------------------------------------------------------------------- scheduling

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

    # ---------------------------------------------------------------------- replicas

    def spawn(self, identity: str, at: float) -> None:
        def start() -> None:
            incarnation = self._incarnations.get(identity, 0) + 1
            self._incarnations[identity] = incarnation
            rng = random.Random(self.rng.getrandbits(32))
            replica = Replica(
                world=self,
                identity=identity,
                incarnation=incarnation,
                rate=1 + self.rng.uniform(-DRIFT, DRIFT),
                offset=self.rng.uniform(0, 1000),
                core=self._make_core(identity, rng),
                wall_skew=self.rng.uniform(-30, 30),
            )
            self.replicas.append(replica)
            self.log(f"{replica.name} starts")
            self.deliver(replica, core.Start())
            self.connect_watch(replica)

        self.at(at, start)

    def deliver(self, replica: Replica, event: core.Event) -> None:
        """Hand `event` to the replica now, or when its pause ends."""
        if not replica.alive:
            return
        replica.queue.append(event)
        if self.now < replica.paused_until:
            return
        self._drain(replica)

    def _drain(self, replica: Replica) -> None:
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

    def _schedule_tick(self, replica: Replica) -> None:
        replica.tick_generation += 1
        wake = replica.core.wake_at
        if wake is None:
            return
        generation = replica.tick_generation

        def fire() -> None:
            if replica.tick_generation == generation:
                self.deliver(replica, core.Tick())

        when = replica.true(wake)
        while replica.local(when) < wake:  # float rounding must not make the tick early
            when = math.nextafter(when, math.inf)
        self.at(when, fire)

    def _perform(self, replica: Replica, action: core.Action, local: float) -> None:
        match action:
            case core.Read() | core.Create() | core.Update():
                self._request(replica, action, local)
            case core.RunHook(_, hook_id, deadline):
                delay = self.rng.expovariate(1 / 0.01)
                if self.faulty("pauses", 0.05):
                    delay = self.rng.uniform(0.5, 3.0)  # a hook that hangs
                done_at = min(self.now + delay, replica.true(deadline))
                self.at(done_at, lambda: self.deliver(replica, core.HookDone(hook_id)))
            case core.Publish(view):
                replica.told_leader = view.role is core.Role.LEADER
            case core.Done():
                replica.alive = False
                self.log(f"{replica.name} stopped")
            case _:
                pass

    # ---------------------------------------------------------------------- network

    def _request(self, replica: Replica, action: core.Action, local: float) -> None:
        replica.sends.append(local)
        window = self.timings.retry_period
        while replica.sends and replica.sends[0] <= local - window:
            replica.sends.popleft()
        if len(replica.sends) > MAX_REQUESTS_PER_RETRY_PERIOD:
            self.fail(f"{replica.name} sent {len(replica.sends)} requests in one retry period")
        if isinstance(action, core.Create | core.Update):
            holder = action.record.holder_identity
            if holder not in ("", replica.identity):
                self.fail(f"{replica.name} wrote a record naming {holder!r}")
            if action.purpose is Purpose.RELEASE and replica.told_leader:
                self.fail(f"{replica.name} released before telling its app it no longer leads")
        replica.request_generation += 1
        generation = replica.request_generation
        timeout = action.timeout  # type: ignore[union-attr]
        answered = [False]

        def answer(result: Answer) -> None:
            if answered[0] or replica.request_generation != generation:
                return
            answered[0] = True
            self.deliver(replica, result)

        self.at(
            replica.true(local + max(timeout, 0.0)),
            lambda: answer(Answer(Outcome.UNKNOWN, error="timeout")),
        )
        if self.faulty("lost_requests", 0.03):
            return
        there = self.now + self._latency()

        def arrive() -> None:
            result = self._serve(replica, action)
            if result is None:
                return  # applied (or not), answer lost
            back = self._latency()
            if self.faulty("lost_answers", 0.05):
                back += self.rng.uniform(1, 4)  # late: past most timeouts
            self.at(self.now + back, lambda: answer(result))

        self.at(there, arrive)

    def _latency(self) -> float:
        base = 0.0002 + min(self.rng.expovariate(1 / 0.003), 0.1)  # a healthy network
        if self.faulty("errors", 0.05) or self.faulty("lost_answers", 0.05):
            base += self.rng.uniform(0.05, 1.5)
        return base

    def _serve(self, replica: Replica, action: core.Action) -> Answer | None:
        if self.faulty("errors", 0.06):
            kind = self.rng.choice(("503", "429", "html", "applied-500"))
            retry_after = self.rng.choice((None, 0.5, 2.0, 30.0)) if kind != "html" else None
            if kind != "applied-500":
                return Answer(Outcome.UNKNOWN, error=kind, retry_after=retry_after)
            self._apply(replica, action)
            return Answer(Outcome.UNKNOWN, error="500 after applying")
        outcome, record = self._apply(replica, action)
        if self.faulty("lost_answers", 0.05):
            return None
        return Answer(outcome, record)

    def _apply(
        self, replica: Replica, action: core.Action
    ) -> tuple[Outcome, VersionedRecord | None]:
        match action:
            case core.Read():
                return Outcome.OK, self.store.get()
            case core.Create(record):
                return self.store.create(replica.name, record)
            case core.Update(record, version):
                return self.store.update(replica.name, record, version)
        raise AssertionError(action)

    # ----------------------------------------------------------------------- watches

    def connect_watch(self, replica: Replica) -> None:
        replica.watch_session += 1
        session = replica.watch_session

        def opened() -> None:
            if replica.watch_session != session or not replica.alive:
                return
            replica.watch_last_delivery = self.now
            self.deliver(replica, core.WatchHealth(True))
            self.deliver(replica, core.WatchEvent(self.store.get()))

        self.at(self.now + self._latency(), opened)

    def break_watches(self, only: Replica | None = None, error: bool = True) -> None:
        for replica in self.replicas:
            if not replica.alive or (only is not None and replica is not only):
                continue
            replica.watch_session += 1  # events of the old session are dropped
            if error:
                self.deliver(replica, core.WatchHealth(False, "watch broke"))
            delay = self.rng.uniform(0.1, self.timings.retry_period * 1.5)
            self.at(self.now + delay, functools.partial(self.connect_watch, replica))

    def notify(self, current: VersionedRecord | None) -> None:
        for replica in self.replicas:
            if not replica.alive:
                continue
            if self.faulty("watch_gaps", 0.1):
                continue  # a gap: this event never arrives
            session = replica.watch_session
            delay = self._latency()
            when = max(self.now + delay, replica.watch_last_delivery)  # in order
            if self.faulty("watch_lag", 0.3):
                when = self.now + self.rng.uniform(0, 1.5)  # late and out of order
                if self.rng.random() < 0.3:
                    self._send_event(replica, session, self.now + self.rng.uniform(1, 3), current)
            replica.watch_last_delivery = max(replica.watch_last_delivery, when)
            self._send_event(replica, session, when, current)

    def _send_event(
        self, replica: Replica, session: int, when: float, current: VersionedRecord | None
    ) -> None:
        def arrive() -> None:
            if replica.watch_session == session:
                self.deliver(replica, core.WatchEvent(current))

        self.at(when, arrive)

    # ------------------------------------------------------------------------ faults

    def _plan_faults(self) -> None:
        rng = self.rng
        t = 0.0
        while True:
            t += 0.05 + rng.expovariate(1 / 0.7)
            if t >= self.fault_until:
                break
            self.at(t, self._random_fault)
        if "foreign" in self.faults:
            self.at(rng.uniform(0, 2), self._foreign_elector)

    def _random_fault(self) -> None:
        rng = self.rng
        live = [r for r in self.replicas if r.alive]
        choice = rng.choice(sorted(self.faults)) if self.faults else None
        if choice == "watch_gaps" and live:
            target = rng.choice(live)
            if rng.random() < 0.5:
                self.log(f"fault: {target.name} watch disconnect")
                self.break_watches(only=target, error=rng.random() < 0.7)
            else:
                self.log(f"fault: {target.name} watch silent")
                target.watch_session += 1  # silent until the idle timeout reconnects it
                self.at(self.now + rng.uniform(0.5, 4), lambda: self.connect_watch(target))
        elif choice == "deletes":
            self.log("fault: delete")
            self.store.delete(tell_watchers=rng.random() < 0.6)
        elif choice == "rewinds":
            self.log("fault: versions rewind")
            self.store.rewind()
        elif choice == "storms":
            self.log("fault: 409 storm")
            for i in range(rng.randint(3, 12)):
                when = self.now + i * rng.uniform(0.01, 0.2)
                if when < self.fault_until:
                    self.at(when, self.store.touch)
        elif choice == "foreign":
            self.store.touch()
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
            self.spawn(target.identity, at=min(self.now + rng.uniform(0.1, 4), self.fault_until))
        elif choice == "twins" and live:
            target = rng.choice(live)
            self.log(f"fault: a twin of {target.identity}")
            self.spawn(target.identity, at=self.now)
        elif choice == "resigns" and live:
            target = rng.choice(live)
            if rng.random() < 0.6:
                self.log(f"fault: {target.name} resigns")
                self.deliver(target, core.Resign())
            else:
                self.log(f"fault: {target.name} shuts down")
                self.deliver(target, core.Shutdown())
                self.spawn(
                    target.identity, at=min(self.now + rng.uniform(0.5, 3), self.fault_until)
                )
        elif choice == "rollouts" and live:
            for target in rng.sample(live, rng.randint(1, len(live))):
                self.deliver(target, core.SetOutdated(True))
                back = min(self.now + rng.uniform(0.5, 4), self.fault_until)
                self.at(back, functools.partial(self.deliver, target, core.SetOutdated(False)))
        elif choice == "eligibility" and live:
            target = rng.choice(live)
            self.deliver(target, core.SetEligible(False, "unhealthy"))
            back = min(self.now + rng.uniform(0.1, 3), self.fault_until)
            self.at(back, lambda: self.deliver(target, core.SetEligible(True, "healthy")))
        # the other faults act through probabilities while faults run

    def _foreign_elector(self) -> None:
        """A client-go-shaped elector ("cg"): polls every retry period, takes the Lease when it
        is free or its observed time ran out, renews its own record, sometimes releases."""
        state: dict[str, Any] = {"seen": None, "seen_at": 0.0}
        period = self.timings.retry_period

        def poll() -> None:
            if self.now >= self.fault_until:
                if (obj := self.store.obj) and obj.record.holder_identity == "cg":
                    self.store.update("cg", obj.record.released(EPOCH), obj.version)
                return
            obj = self.store.obj
            record = obj.record if obj else None
            if record != state["seen"]:
                state["seen"], state["seen_at"] = record, self.now
            wall = EPOCH + timedelta(seconds=self.now)
            if obj is None:
                pass  # client-go would create; leave creation to the replicas
            elif obj.record.holder_identity == "cg":
                if self.rng.random() < 0.1:
                    self.store.update("cg", obj.record.released(wall), obj.version)
                else:
                    renewed = LeaderRecord(
                        "cg", 3, obj.record.acquire_time, wall, obj.record.lease_transitions
                    )
                    self.store.update("cg", renewed, obj.version)
            elif (
                not obj.record.holder_identity or self.now > state["seen_at"] + 3 * 1.2
            ) and self.rng.random() < 0.5:
                taken = LeaderRecord("cg", 3, wall, wall, obj.record.lease_transitions + 1)
                self.store.update("cg", taken, obj.version)
            self.at(self.now + period * self.rng.uniform(1, 1.2), poll)

        poll()

    # -------------------------------------------------------------------- invariants

    def fail(self, message: str) -> None:
        trace = "\n".join(["", "trace (true time, replica <- event -> actions):", *self.trace])
        raise Violation(
            f"seed {self.seed}: t={self.now:.4f}: {message}" + (trace if self.trace_on else "")
        )

    def check_after_step(self, replica: Replica) -> None:
        leaders = [r for r in self.replicas if (r.alive or r.crashed) and r.claims(self.now)]
        if len(leaders) > 1:
            self.fail("two leaders at once: " + ", ".join(r.name for r in leaders))
        if replica.claims(self.now):
            term = replica.core._term
            if replica.claimed_term != term:
                replica.claimed_term = term
                view = replica.core.view(replica.local(self.now))
                token = view.fencing_token
                assert token is not None and term is not None
                lease = self.store.term_incarnation[
                    (replica.identity, term.acquire_time, term.transitions)
                ]
                for earlier in self.claims:
                    if earlier.lease == lease and token <= earlier.token:
                        self.fail(
                            f"{replica.name} leads with fencing token {token}, not above "
                            f"{earlier.replica}'s {earlier.token}"
                        )
                self.claims.append(Claim(replica.name, token, self.now, lease))
                self.log(f"{replica.name} LEADS token={token}")
        if (
            self.quiet_leader_at is None
            and self.now >= self.fault_until
            and any(r.claims(self.now) for r in self.replicas if r.alive)
        ):
            self.quiet_leader_at = self.now


def _short(item: object) -> str:
    text = repr(item)
    return text if len(text) < 160 else text[:157] + "..."


@dataclass(frozen=True)
class Result:
    seed: int
    faults: tuple[str, ...]
    leaders: int
    writes: int
    first_quiet_leader: float  # seconds after the faults stopped
    trace: list[str]  # with trace=True: every step, for reading


def simulate(
    seed: int,
    replicas: int = 3,
    fault_seconds: float = 8.0,
    faults: tuple[str, ...] | None = None,
    rng: random.Random | None = None,
    trace: bool = False,
    make_core: Callable[[str, random.Random], ElectionCore] | None = None,
) -> Result:
    """Run one world; raise Violation on a broken invariant (liveness included)."""
    world = World(seed, replicas, fault_seconds, faults, rng, trace, make_core)
    t = TIMINGS
    # Liveness: once faults stop, a leader within lease duration + retry period on the slowest
    # clock (a crashed leader's lease, a creation wait or a sit-out may start just then), plus
    # one request timeout (a request sent before the faults stopped may still time out) + 0.5 s.
    request_timeout = max(t.renew_deadline, 1.0)
    bound = (t.lease_duration + 1.2 * t.retry_period) / (1 - DRIFT) + request_timeout + 0.5
    # Everyone paused or resigned comes back: resume, make eligible.
    world.run(fault_seconds)
    for replica in world.replicas:  # pauses end, apps get healthy
        if replica.alive:
            replica.paused_until = min(replica.paused_until, world.now)
            world.deliver(replica, core.SetEligible(True, "healthy"))
            world.deliver(replica, core.SetOutdated(False))
    world.run(fault_seconds + bound + 5 * t.retry_period)
    first = world.quiet_leader_at
    if first is None or first - fault_seconds > bound:
        late = "none" if first is None else f"after {first - fault_seconds:.2f}s"
        world.fail(f"no leader within {bound:.2f}s after the faults stopped ({late})")
    assert first is not None
    if not any(r.alive and r.claims(world.now) for r in world.replicas):
        world.fail("leadership did not stay once the faults stopped")
    return Result(
        seed,
        tuple(sorted(world.faults)),
        len(world.claims),
        len(world.store.writes),
        first - fault_seconds,
        world.trace,
    )
