"""The election's decisions, as a pure state machine: events in, actions out, no I/O.

`ElectionCore.step(event, now, wall)` takes one event with the local monotonic time `now` and
wall time `wall`, and returns the actions to perform (read, create, update with this exact record
and version, publish, run a hook, ...). It never sleeps, awaits or reads a clock; `wake_at` says
when it wants a `Tick`. The asyncio driver (elector.py) performs the actions; the simulation in
tests/sim/ drives many cores through hostile schedules with the same events.

At most one request (read or write) is in flight at a time: every decision is taken on the
state as it is when the request is sent, and every answer is applied to the state it belongs to.

Safety: why two replicas never lead at once
--------------------------------------------
Assumptions: every replica's monotonic clock runs at a rate within [1 - r, 1 + r] of true time
(no shared or synchronised clocks: remote wall times are never compared with local ones); the
backend's writes are compare-and-swap on an opaque version (an update succeeds only if the record
is still exactly at the version read; a create only if there is no record); all replicas of an
election use the same lease duration L and renew deadline D, with

    D * (1 + r) < L * (1 - r)        (r < (L - D) / (L + D): 20 % for client-go's 15 s / 10 s)

Leadership: a replica leads only on the strength of a write it saw succeed. If that write was
sent at local time s, it claims leadership until s + D on its own clock, never later, unless a
newer write of its own succeeded. A follower may write a new holder over a record only after it
has seen that record's content unchanged for the record's `leaseDurationSeconds` on its own
clock. Its write is a compare-and-swap on the version it saw, so if it succeeds, the holder
wrote nothing since: the holder's last successful write is the one the follower saw, applied
after it was sent and before the follower first saw it. In true time the holder's claim ends
within D / (1 - r) of the send; the follower writes no sooner than L / (1 + r) after it saw the
record, so the holder's claim ended before the follower's write was even sent. Each rule below
exists to keep one of those premises true:

- Own identity only. Every record written names this replica (or nobody, on release), built
  from this replica's own term, never from the record read: renewing another writer's record
  would extend a lease nobody here holds.
- Terms, not names. A term is (acquireTime, leaseTransitions) of our acquisition. A record that
  carries our identity but not our term belongs to another process using the same identity (a
  recreated pod, a copied `--id`) and is waited out like any other holder; a new acquisition
  always increments `leaseTransitions`, so fencing tokens grow with every new leader.
- Conflicts (409). A conflict says someone wrote since our read -- possibly our own write whose
  answer was lost. We re-read; only a fresh read decides (an earlier write of ours that landed is
  recognised by its exact content). Writes after a conflict wait a jittered retry period, so
  racing replicas and foreign writers cannot drive a request storm.
- Freshness. Watch events may be late, repeated or out of order, and versions are opaque (an
  etcd restore rewinds them), so nothing is ordered by version. Followers take any event as the
  current record and restart their expiry count when the content changes: a stale event only
  delays them, and their writes are compare-and-swap. A leader never steps down on a watch event
  alone: an event that contradicts its term makes it re-read, and only that answer decides.
- Creation. A deleted Lease loses its history: its holder may still act on a write nobody can
  see any more, and a replica whose watch was blind cannot even know there was one. So a replica
  that wins by *creating* the record claims nothing until one lease duration (the longest it
  knows) has passed on its clock since the create's answer; meanwhile it holds and renews the
  record, so others see a holder. Any deleted holder's last write came before that create was
  applied, so its claim ended before ours starts, by the same inequality -- whatever anyone saw.
  The same holds at first start (it cannot tell "never existed" from "deleted a moment ago"):
  the first leader of a new Lease leads one lease duration after creating it. The leader itself
  re-creates its deleted record at once with its own term (its claim rests on its own writes);
  followers give it one retry period to do so. A creation continues `leaseTransitions` from the
  largest value this replica saw: tokens grow for as long as the Lease object lives, and across
  a deletion the creator saw (one it did not see cannot be known).
- Release. The leader stops claiming and tells its app (and waits for the hook that does so)
  before it writes the release; a released record (no holder) is free at once. A replica still
  in its creation wait never releases (that would cut the wait short for everyone): its record
  lapses instead. After resigning,
  a replica sits out one lease duration so that another wins.
- Lost answers. A write whose outcome is unknown (timeout, 5xx, dropped connection) may have
  landed. It never extends a claim by itself; the next fresh read shows whether it landed, and
  then the claim runs from that write's send time, which is still before it was applied.

Not guaranteed: a writer that does not follow these rules (a client-go elector with a longer
renew deadline than our lease duration, a hand edit) can take the Lease while a leader's claim
runs; the leader steps down as soon as it reads that record. Leadership is a claim with a
deadline (`valid_until`), not a lock on the app's storage: apps that need exclusion pass the
fencing token along.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta

from sidecar.election.record import LeaderRecord, VersionedRecord

# Requests (reads and writes, not the watch) a replica may send in any window of one retry
# period, measured on its own clock. Normal: one renewal, or one acquisition plus a read.
MAX_REQUESTS_PER_RETRY_PERIOD = 5
# During a rollout, how long outdated replicas leave a free Lease to the newer ones.
ROLLOUT_DEFER_PERIODS = 2.0


@dataclass(frozen=True, slots=True)
class Timings:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


# --------------------------------------------------------------------------- events (inputs)


@dataclass(frozen=True, slots=True)
class Start:
    """The driver is running: read the record (the watch will follow)."""


@dataclass(frozen=True, slots=True)
class Tick:
    """A timer the core asked for (`wake_at`) fired, or the driver just wants a decision."""


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """The watch delivered a record (None: deleted or absent). May be stale or repeated."""

    current: VersionedRecord | None


@dataclass(frozen=True, slots=True)
class WatchHealth:
    """The watch started to work (healthy) or failed; followers poll while it fails."""

    healthy: bool
    error: str | None = None


class Outcome(enum.Enum):
    OK = "ok"
    CONFLICT = "conflict"  # 409 / AlreadyExists: someone wrote first
    NOT_FOUND = "not found"  # update of a record that no longer exists
    FORBIDDEN = "forbidden"  # 401/403: not applied, and retrying will not help soon
    UNKNOWN = "unknown"  # timeout, 5xx, 429, lost answer, malformed answer: may have landed


@dataclass(frozen=True, slots=True)
class Answer:
    """The outcome of the request in flight (`Read`, `Create` or `Update`).

    For a read, OK with `record` None means the record does not exist.
    """

    outcome: Outcome
    record: VersionedRecord | None = None
    error: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class HookDone:
    hook_id: int


@dataclass(frozen=True, slots=True)
class Resign:
    pass


@dataclass(frozen=True, slots=True)
class SetEligible:
    eligible: bool
    app_health: str | None = None
    reason: str | None = None  # why not, for the logs (default: the app is unhealthy)


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class SetOutdated:
    """A rollout: a ready replica of a newer revision exists, and this one is not of it.

    An outdated leader hands over (tells its app, releases); an outdated follower leaves a free
    Lease to the newer replicas for `ROLLOUT_DEFER_PERIODS` retry periods. This changes only
    when leadership moves, never what keeps it safe.
    """

    outdated: bool


Event = (
    Start
    | Tick
    | WatchEvent
    | WatchHealth
    | Answer
    | HookDone
    | Resign
    | SetEligible
    | Shutdown
    | SetOutdated
)


# -------------------------------------------------------------------------- actions (outputs)


class Purpose(enum.Enum):
    ACQUIRE = "acquire"
    RENEW = "renew"
    RECREATE = "recreate"  # the leader puts its deleted record back
    RELEASE = "release"


@dataclass(frozen=True, slots=True)
class Read:
    timeout: float


@dataclass(frozen=True, slots=True)
class Create:
    record: LeaderRecord
    timeout: float
    purpose: Purpose


@dataclass(frozen=True, slots=True)
class Update:
    record: LeaderRecord
    version: str
    timeout: float
    purpose: Purpose


class HookKind(enum.Enum):
    BECOMING_LEADER = "becoming leader"  # after the Lease is won, before the app is told
    STEPPING_DOWN = "stepping down"  # after the app was told "not leader", before a release


@dataclass(frozen=True, slots=True)
class RunHook:
    """Run the hook until `deadline` (local monotonic), then answer `HookDone(hook_id)`."""

    kind: HookKind
    hook_id: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Publish:
    """`view` changed: tell subscribers."""

    view: View


@dataclass(frozen=True, slots=True)
class Acquired:
    fencing_token: int


@dataclass(frozen=True, slots=True)
class Lost:
    reason: str


@dataclass(frozen=True, slots=True)
class Resigned:
    """The answer to `Resign`: whether it led, and whether the release landed."""

    led: bool
    released: bool
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Log:
    level: str  # "debug" | "info" | "warning" | "error"
    message: str
    fields: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True, slots=True)
class Done:
    """Shutdown finished: the release (if any) was written or given up."""


Action = Read | Create | Update | RunHook | Publish | Acquired | Lost | Resigned | Log | Done


class Role(enum.StrEnum):
    LEADER = "leader"
    FOLLOWER = "follower"
    UNKNOWN = "unknown"  # no fresh observation: starting, or the backend cannot be used


@dataclass(frozen=True, slots=True)
class View:
    """What the core knows, for the APIs. Times are local monotonic."""

    role: Role
    leader: str  # the holder's identity while its lease runs; "" when none or unknown
    valid_until: float | None  # leader only
    fencing_token: int | None
    record: LeaderRecord | None
    error: str | None
    ready: bool
    app_health: str | None


# ------------------------------------------------------------------------------------ core


@dataclass(frozen=True, slots=True)
class _Term:
    acquire_time: datetime | None
    transitions: int

    @staticmethod
    def of(record: LeaderRecord) -> _Term:
        return _Term(record.acquire_time, record.lease_transitions)


@dataclass(frozen=True, slots=True)
class _Sent:
    """A write on its way, or one whose answer was lost."""

    record: LeaderRecord
    purpose: Purpose
    sent_at: float
    created: bool = False


class _Step(enum.Enum):
    """Where a voluntary step-down (resign, shutdown, app unhealthy) stands."""

    TELLING = 1  # the stepping-down hook runs: the app hears "not leader" first
    RELEASING = 2  # the release write may be sent
    DONE = 3


class ElectionCore:
    def __init__(self, identity: str, timings: Timings, rng: random.Random | None = None) -> None:
        self.identity = identity
        self.timings = timings
        self._rng = rng or random.Random()
        # What we know of the record.
        self._record: VersionedRecord | None = None
        self._have_view = False
        self._changed_at = 0.0  # local time the record's content last changed, as seen here
        self._absent_since: float | None = None  # local time we first saw it absent
        self._claim_not_before = 0.0  # after a create: no claim before this (see Creation)
        self._longest_duration = timings.lease_duration
        self._highest_transitions = -1
        self._watch_healthy = False
        self._watch_error: str | None = None
        self._error: str | None = None  # the last request failed: we know nothing
        # Our own claim.
        self._term: _Term | None = None  # the term we hold (leading) or last held
        self._leading = False
        self._announced = False  # the becoming-leader hook finished: the app may be told
        self._last_renew = 0.0  # send time of the last write of ours that we saw succeed
        self._valid_until = 0.0
        # Requests.
        self._in_flight: _Sent | bool = False  # a _Sent write, True for a read
        self._unconfirmed: _Sent | None = None  # a write whose answer was lost
        self._need_read = False
        self._not_before = 0.0  # back-off and Retry-After: no request before
        self._write_not_before = 0.0  # after losing a race: no acquisition before
        self._failures = 0
        self._sent_times: deque[float] = deque()
        self._next_poll = 0.0
        # Control.
        self._started = False
        self._eligible = True
        self._outdated = False
        self._app_health: str | None = None
        self._sit_out_until = 0.0
        self._stepping: _Step | None = None  # a voluntary step-down in progress
        self._step_reason = ""
        self._resign_pending = False
        self._release_error: str | None = None
        self._release_attempts = 0
        self._shutting_down = False
        self._done = False
        self._hook_ids = 0
        self._waiting_hook: int | None = None
        self._becoming_hook: int | None = None
        self._published: View | None = None
        self._wake_at: float | None = None

    # ----------------------------------------------------------------------- public

    @property
    def wake_at(self) -> float | None:
        """Local monotonic time of the next `Tick` the core needs, if any."""
        return self._wake_at

    @property
    def done(self) -> bool:
        return self._done

    def is_leader(self, now: float) -> bool:
        """Whether the app may act as leader at local time `now`."""
        return self._leading and self._announced and now < self._valid_until

    def holder(self, now: float) -> str:
        """Who holds the Lease as far as this replica knows: itself from the moment it won
        (even before its app is told), else the record's holder while its lease runs, else ""
        (free, expired, or unknown). For sharding's bookkeeping, never for a claim."""
        if self._leading:
            return self.identity
        if self._record is None or not self._held(now):
            return ""
        return self._record.record.holder_identity

    def view(self, now: float) -> View:
        record = self._record.record if self._record else None
        if self.is_leader(now):
            assert self._term is not None
            return View(
                Role.LEADER,
                self.identity,
                self._valid_until,
                self._term.transitions,
                record,
                self._error or self._watch_error,
                True,
                self._app_health,
            )
        if self._error is not None or not self._have_view:
            role, leader, token = Role.UNKNOWN, "", None
        elif self._leading:
            # Won but not told yet (hook running, creation wait): nobody may act as leader.
            role, leader, token = Role.FOLLOWER, "", None
        else:
            held = self._held(now)
            role = Role.FOLLOWER
            leader = record.holder_identity if held and record else ""
            token = record.lease_transitions if held and record else None
        return View(
            role,
            leader,
            None,
            token,
            record,
            self._error or self._watch_error,
            self._have_view,
            self._app_health,
        )

    def step(self, event: Event, now: float, wall: datetime) -> list[Action]:
        out: list[Action] = []
        if self._done:
            if isinstance(event, Resign):
                out.append(Resigned(led=False, released=False))
            return out
        # A deadline that passed ends the term before anything else is applied: a renewal
        # answered after it cannot revive the claim (a gap always starts a new term).
        self._expire(now, out)
        self._apply(event, now, out)
        self._expire(now, out)
        self._maybe_announce(now, out)
        self._decide(now, wall, out)
        self._publish_if_changed(now, out)
        self._wake_at = self._next_wake(now)
        return out

    # ------------------------------------------------------------------- applying

    def _apply(self, event: Event, now: float, out: list[Action]) -> None:
        match event:
            case Start():
                self._started = True
            case Tick():
                pass
            case WatchEvent(current):
                self._on_watch_event(current, now, out)
            case WatchHealth(healthy, error):
                self._watch_healthy = healthy
                if error != self._watch_error and error:
                    out.append(Log("warning", "watch error", (("error", error),)))
                self._watch_error = None if healthy else error
                self._next_poll = now  # poll at once while the watch is down
            case Answer():
                self._on_answer(event, now, out)
            case HookDone(hook_id):
                self._on_hook_done(hook_id, now, out)
            case Resign():
                if not self._leading or self._stepping is not None:
                    out.append(Resigned(led=False, released=False))
                else:
                    self._resign_pending = True
                    self._sit_out_until = now + self._longest_duration
                    self._begin_step_down("resigned", now, out)
            case SetEligible(eligible, app_health, reason):
                if eligible != self._eligible:
                    out.append(Log("debug", "eligibility changed", (("eligible", eligible),)))
                self._eligible = eligible
                self._app_health = app_health
                if not eligible and self._leading and self._stepping is None:
                    self._begin_step_down(reason or "the app is unhealthy", now, out)
            case SetOutdated(outdated):
                if outdated != self._outdated:
                    out.append(Log("info", "rollout", (("outdated", outdated),)))
                self._outdated = outdated
                if outdated and self._leading and self._stepping is None:
                    self._begin_step_down("a replica of a newer revision is ready", now, out)
            case Shutdown():
                self._shutting_down = True
                if self._leading and self._stepping is None:
                    self._begin_step_down("shutdown", now, out)

    def _on_watch_event(
        self, current: VersionedRecord | None, now: float, out: list[Action]
    ) -> None:
        if self._leading:
            # Only a fresh answer ends a term: an event may be late. One that contradicts the
            # term makes us read now.
            if current is None or not self._is_ours(current.record):
                self._need_read = True
            return
        self._error = None
        self._observe(current, now, out)

    def _observe(self, current: VersionedRecord | None, now: float, out: list[Action]) -> None:
        """Take `current` as the record now; restart the expiry count if its content changed."""
        previous = self._record
        if current is None:
            if previous is not None or not self._have_view:
                self._absent_since = now
            self._record = None
        else:
            record = current.record
            if previous is None or previous.record != record:
                self._changed_at = now
                holder = record.holder_identity
                if (
                    holder
                    and holder != self.identity
                    and (previous is None or previous.record.holder_identity != holder)
                ):
                    out.append(
                        Log(
                            "info",
                            "observed new leader",
                            (("leader", holder), ("transitions", record.lease_transitions)),
                        )
                    )
                elif (
                    holder == self.identity
                    and not self._is_ours(record)
                    and not self._leading
                    and not self._sending(record)  # our own write, seen before its answer
                ):
                    out.append(
                        Log(
                            "warning",
                            "the Lease names this identity but this process did not acquire it "
                            "(another process with the same identity, or an earlier one): "
                            "waiting for it to lapse",
                        )
                    )
            self._record = current
            self._absent_since = None
            self._longest_duration = max(
                self._longest_duration, float(record.lease_duration_seconds)
            )
            self._highest_transitions = max(self._highest_transitions, record.lease_transitions)
        self._have_view = True

    def _on_answer(self, answer: Answer, now: float, out: list[Action]) -> None:
        sent = self._in_flight
        self._in_flight = False
        if sent is False:
            return  # nothing was asked: ignore (cannot happen with a correct driver)
        if answer.outcome is Outcome.OK:
            self._error = None
            self._failures = 0
        elif self._stepping is not None:
            self._release_attempts += 1
            self._release_error = answer.error or answer.outcome.value
        if sent is True:
            self._on_read(answer, now, out)
        else:
            assert isinstance(sent, _Sent)
            self._on_write(sent, answer, now, out)

    def _on_read(self, answer: Answer, now: float, out: list[Action]) -> None:
        if answer.outcome is not Outcome.OK:
            self._failed(answer, now, out)
            return
        self._need_read = False
        current = answer.record
        landed = self._unconfirmed
        self._unconfirmed = None
        if current is not None and landed is not None and current.record == landed.record:
            # A write whose answer was lost did land: it counts from its send time.
            self._succeeded(landed, current, now, out)
            return
        self._observe(current, now, out)
        if self._leading:
            if current is None:
                return  # deleted: _decide puts our record back
            if not self._is_ours(current.record) and self._stepping is None:
                self._lose("another holder took the Lease", now, out)

    def _on_write(self, sent: _Sent, answer: Answer, now: float, out: list[Action]) -> None:
        if answer.outcome is Outcome.OK and answer.record is not None:
            self._unconfirmed = None
            self._succeeded(sent, answer.record, now, out)
            return
        if answer.outcome is Outcome.UNKNOWN:
            self._unconfirmed = sent
            self._need_read = True
            self._failed(answer, now, out)
            return
        self._unconfirmed = None
        if answer.outcome in (Outcome.CONFLICT, Outcome.NOT_FOUND):
            # Someone wrote first, or deleted it -- maybe our own lost write. Read, then decide;
            # another write of the same kind waits a jittered retry period.
            self._need_read = True
            if sent.purpose is Purpose.ACQUIRE:
                self._write_not_before = now + self._jittered(self.timings.retry_period)
            out.append(
                Log("debug", f"{sent.purpose.value} conflict", (("outcome", answer.outcome.value),))
            )
            return
        self._failed(answer, now, out)  # FORBIDDEN

    def _succeeded(
        self, sent: _Sent, result: VersionedRecord, now: float, out: list[Action]
    ) -> None:
        if sent.purpose is Purpose.ACQUIRE:
            self._term = _Term.of(sent.record)  # before observing it: it is ours
        self._observe(result, now, out)
        if sent.purpose is Purpose.RELEASE:
            self._term = None
            self._finish_release(released=True, error=None, out=out)
            return
        if sent.purpose is Purpose.ACQUIRE:
            self._term = _Term.of(sent.record)
            if sent.created:
                self._claim_not_before = max(self._claim_not_before, now + self._longest_duration)
                out.append(
                    Log(
                        "info",
                        "created the Lease: leading once one lease duration has passed",
                        (("seconds", self._longest_duration),),
                    )
                )
            self._leading = True
            self._announced = False
            self._last_renew = sent.sent_at
            self._valid_until = sent.sent_at + self.timings.renew_deadline
            if self._shutting_down or not self._eligible:
                reason = "shutdown" if self._shutting_down else "the app is unhealthy"
                self._begin_step_down(reason, now, out)
            elif now >= self._valid_until:
                # Won too late to claim anything: an ended term of ours, which we may take
                # again at once (nobody else acts on it).
                self._leading = False
            return
        # RENEW or RECREATE: the term goes on.
        if not self._leading or self._term != _Term.of(sent.record):
            return
        if sent.sent_at > self._last_renew:
            self._last_renew = sent.sent_at
            self._valid_until = sent.sent_at + self.timings.renew_deadline

    def _failed(self, answer: Answer, now: float, out: list[Action]) -> None:
        self._error = answer.error or answer.outcome.value
        self._failures += 1
        if self._leading:
            pause = self.timings.retry_period / 4
        else:
            pause = min(
                self.timings.retry_period / 4 * 2 ** (self._failures - 1), self.timings.retry_period
            )
        pause = self._jittered(pause)
        if answer.retry_after is not None and answer.retry_after > 0:
            pause = max(pause, min(answer.retry_after, self.timings.renew_deadline))
        self._not_before = max(self._not_before, now + pause)
        out.append(Log("warning", "backend error", (("error", self._error),)))

    def _on_hook_done(self, hook_id: int, now: float, out: list[Action]) -> None:
        if hook_id == self._becoming_hook:
            self._becoming_hook = None
            if self._leading and self._stepping is None and now < self._valid_until:
                self._announced = True
                assert self._term is not None
                out.append(Log("info", "acquired", (("transitions", self._term.transitions),)))
                out.append(Acquired(self._term.transitions))
        if hook_id == self._waiting_hook:
            self._waiting_hook = None
            if self._stepping is _Step.TELLING:
                self._stepping = _Step.RELEASING

    # ------------------------------------------------------------------ leadership

    def _sending(self, record: LeaderRecord) -> bool:
        """Whether `record` is what the write in flight (or one whose answer was lost) says."""
        sent = self._in_flight if isinstance(self._in_flight, _Sent) else self._unconfirmed
        return sent is not None and sent.record == record

    def _is_ours(self, record: LeaderRecord) -> bool:
        return (
            record.holder_identity == self.identity
            and self._term is not None
            and _Term.of(record) == self._term
        )

    def _held(self, now: float) -> bool:
        """Whether someone else's lease runs: nobody may take the record yet."""
        if self._record is None:
            return False
        record = self._record.record
        if not record.holder_identity:
            return False
        if self._is_ours(record) and not self._leading:
            return False  # our own ended term: nobody else acts on it (see the docstring)
        return now < self._changed_at + _duration(record, self.timings)

    def _free_at(self, now: float) -> float | None:
        """When this replica may write itself as holder; None when it knows too little."""
        if not self._have_view:
            return None
        if self._record is None:
            if self._absent_since is None:
                return None
            # Give a live leader one retry period to put its record back.
            return self._absent_since + self.timings.retry_period * 1.2
        record = self._record.record
        if not record.holder_identity or (self._is_ours(record) and not self._leading):
            return self._changed_at  # released, or our own ended term
        return self._changed_at + _duration(record, self.timings)

    def _acquire_at(self, now: float) -> float | None:
        """When this replica will try to take the Lease, if nothing changes."""
        free_at = self._free_at(now)
        if free_at is None:
            return None
        if self._outdated:  # a rollout: newer replicas first
            free_at += ROLLOUT_DEFER_PERIODS * self.timings.retry_period
        return max(free_at, self._sit_out_until, self._write_not_before)

    def _maybe_announce(self, now: float, out: list[Action]) -> None:
        """A won term is told to the app once the becoming-leader hook ran (and, after a
        create, once the creation wait is over)."""
        if (
            self._leading
            and not self._announced
            and self._becoming_hook is None
            and self._stepping is None
            and now >= self._claim_not_before
            and now < self._valid_until
        ):
            self._hook_ids += 1
            self._becoming_hook = self._hook_ids
            out.append(RunHook(HookKind.BECOMING_LEADER, self._hook_ids, self._valid_until))

    def _expire(self, now: float, out: list[Action]) -> None:
        if self._leading and self._stepping is None and now >= self._valid_until:
            self._lose("renew deadline passed without a successful renewal", now, out)

    def _lose(self, reason: str, now: float, out: list[Action]) -> None:
        """Involuntary: stop claiming at once; nothing to release."""
        if not self._leading:
            return
        was_announced = self._announced
        self._leading = False
        self._announced = False
        self._becoming_hook = None
        transitions = self._term.transitions if self._term else None
        out.append(Log("warning", "lost", (("reason", reason), ("transitions", transitions))))
        self._publish_if_changed(now, out)
        if was_announced:
            out.append(Lost(reason))
        self._hook_ids += 1
        out.append(RunHook(HookKind.STEPPING_DOWN, self._hook_ids, now + self._request_timeout()))

    def _begin_step_down(self, reason: str, now: float, out: list[Action]) -> None:
        """Voluntary: tell the app first (publish, hook), then release."""
        was_announced = self._announced
        self._announced = False
        self._becoming_hook = None
        self._stepping = _Step.TELLING
        self._step_reason = reason
        self._release_attempts = 0
        self._publish_if_changed(now, out)
        if was_announced:
            out.append(Lost(reason))
        self._hook_ids += 1
        self._waiting_hook = self._hook_ids
        out.append(RunHook(HookKind.STEPPING_DOWN, self._hook_ids, now + self._request_timeout()))

    def _finish_release(self, released: bool, error: str | None, out: list[Action]) -> None:
        self._leading = False
        self._stepping = None
        if released:
            out.append(Log("info", "released", (("reason", self._step_reason),)))
        else:
            out.append(
                Log("warning", "release failed", (("reason", self._step_reason), ("error", error)))
            )
        if self._resign_pending:
            self._resign_pending = False
            out.append(Resigned(led=True, released=released, error=error))

    # -------------------------------------------------------------------- deciding

    def _decide(self, now: float, wall: datetime, out: list[Action]) -> None:
        if not self._started:
            return
        if self._shutting_down and self._stepping is None and not self._leading:
            acquiring = (
                isinstance(self._in_flight, _Sent) and self._in_flight.purpose is Purpose.ACQUIRE
            )
            if not acquiring:  # an acquisition in flight may win: then release it
                self._done = True
                out.append(Done())
                return
        if self._in_flight is not False or self._stepping is _Step.TELLING:
            return
        if now < self._not_before or not self._budget_allows(now):
            return
        if self._stepping is _Step.RELEASING:
            self._decide_release(now, wall, out)
            if self._shutting_down and self._stepping is None:
                self._done = True
                out.append(Done())
        elif self._leading:
            self._decide_leader(now, wall, out)
        else:
            self._decide_follower(now, wall, out)

    def _decide_release(self, now: float, wall: datetime, out: list[Action]) -> None:
        if self._release_attempts >= 3:
            self._finish_release(False, self._release_error or "the Lease kept changing", out)
            return
        if self._need_read:
            self._send_read(now, out)
            return
        if self._record is None:
            self._term = None
            self._finish_release(False, "the Lease was deleted", out)
            return
        record = self._record.record
        if not self._is_ours(record):
            self._term = None
            self._finish_release(False, "another holder took the Lease", out)
            return
        if now < self._claim_not_before:
            # Still in the creation wait: a release would let others lead while a deleted
            # holder may still act. The record lapses on its own instead.
            self._finish_release(False, "the Lease was created moments ago; it lapses instead", out)
            return
        released = record.released(wall)
        self._send(
            Update(released, self._record.version, self._request_timeout(), Purpose.RELEASE),
            released,
            now,
            out,
        )

    def _decide_leader(self, now: float, wall: datetime, out: list[Action]) -> None:
        assert self._term is not None
        if self._need_read:
            self._send_read(now, out, timeout=self._valid_until - now)
            return
        record = self._own_record(wall)
        if self._record is None:
            out.append(Log("warning", "the Lease was deleted: putting it back"))
            self._send(Create(record, self._valid_until - now, Purpose.RECREATE), record, now, out)
            return
        if now < self._last_renew + self.timings.retry_period:
            return
        self._send(
            Update(record, self._record.version, self._valid_until - now, Purpose.RENEW),
            record,
            now,
            out,
        )

    def _decide_follower(self, now: float, wall: datetime, out: list[Action]) -> None:
        polling = not self._watch_healthy and now >= self._next_poll
        if self._need_read or not self._have_view or polling:
            self._next_poll = now + self._jittered(self.timings.retry_period)
            self._send_read(now, out)
            return
        acquire_at = self._acquire_at(now)
        if not self._eligible or acquire_at is None or now < acquire_at:
            return
        # Tokens keep growing: past the largest leaseTransitions ever seen here.
        transitions = self._highest_transitions + 1
        record = LeaderRecord(
            holder_identity=self.identity,
            lease_duration_seconds=round(self.timings.lease_duration),
            acquire_time=wall,
            renew_time=wall,
            lease_transitions=transitions,
        )
        if self._record is None:
            self._send(Create(record, self._request_timeout(), Purpose.ACQUIRE), record, now, out)
            return
        old = self._record.record
        record = LeaderRecord(
            holder_identity=self.identity,
            lease_duration_seconds=round(self.timings.lease_duration),
            acquire_time=wall,
            renew_time=_after(old.renew_time, wall),
            lease_transitions=max(old.lease_transitions, self._highest_transitions) + 1,
        )
        self._send(
            Update(record, self._record.version, self._request_timeout(), Purpose.ACQUIRE),
            record,
            now,
            out,
        )

    def _own_record(self, wall: datetime) -> LeaderRecord:
        """A renewal of our term, built from the term, never from the record read."""
        assert self._term is not None
        previous = self._record.record.renew_time if self._record else None
        return LeaderRecord(
            holder_identity=self.identity,
            lease_duration_seconds=round(self.timings.lease_duration),
            acquire_time=self._term.acquire_time,
            renew_time=_after(previous, wall),
            lease_transitions=self._term.transitions,
        )

    def _send(
        self, action: Create | Update, record: LeaderRecord, now: float, out: list[Action]
    ) -> None:
        self._in_flight = _Sent(record, action.purpose, now, isinstance(action, Create))
        self._sent_times.append(now)
        out.append(action)

    def _send_read(self, now: float, out: list[Action], timeout: float | None = None) -> None:
        self._in_flight = True
        self._sent_times.append(now)
        out.append(Read(timeout if timeout is not None else self._request_timeout()))

    def _budget_allows(self, now: float) -> bool:
        window = self.timings.retry_period
        while self._sent_times and self._sent_times[0] <= now - window:
            self._sent_times.popleft()
        return len(self._sent_times) < MAX_REQUESTS_PER_RETRY_PERIOD

    # ----------------------------------------------------------------- publishing

    def _publish_if_changed(self, now: float, out: list[Action]) -> None:
        view = self.view(now)
        if view != self._published:
            self._published = view
            out.append(Publish(view))

    def _next_wake(self, now: float) -> float | None:
        if self._done:
            return None
        times: list[float] = []
        if self._leading and self._stepping is None:
            times.append(self._valid_until)
            if not self._announced and self._becoming_hook is None:
                times.append(self._claim_not_before)
        if self._published is not None and self._published.role is Role.FOLLOWER:
            record = self._record.record if self._record else None
            if record is not None and record.holder_identity and self._held(now):
                times.append(self._changed_at + _duration(record, self.timings))
        if self._in_flight is False and self._stepping is not _Step.TELLING:
            wanted = self._wanted_request_time(now)
            if wanted is not None:
                times.append(max(wanted, self._not_before, self._budget_free_at(now)))
        # This step already decided everything due by now: only a later time can change that.
        future = [t for t in times if t > now]
        return min(future) if future else None

    def _wanted_request_time(self, now: float) -> float | None:
        """When the next request would be sent if nothing else happened."""
        if not self._started:
            return None
        if self._stepping is _Step.RELEASING or self._need_read:
            return now
        if self._leading:
            return self._last_renew + self.timings.retry_period
        if not self._have_view:
            return now
        times: list[float] = []
        if not self._watch_healthy:
            times.append(self._next_poll)
        if self._eligible:
            acquire_at = self._acquire_at(now)
            if acquire_at is not None:
                times.append(acquire_at)
        return min(times) if times else None

    def _budget_free_at(self, now: float) -> float:
        if len(self._sent_times) < MAX_REQUESTS_PER_RETRY_PERIOD:
            return now
        return self._sent_times[0] + self.timings.retry_period

    # -------------------------------------------------------------------- helpers

    def _request_timeout(self) -> float:
        return max(self.timings.renew_deadline, 1.0)

    def _jittered(self, seconds: float) -> float:
        return seconds * (1.0 + 0.2 * self._rng.random())


def _duration(record: LeaderRecord, timings: Timings) -> float:
    seconds = record.lease_duration_seconds
    return float(seconds) if seconds > 0 else timings.lease_duration


def _after(previous: datetime | None, now: datetime) -> datetime:
    """A renewTime later than the last one, even if our wall clock stands still or went back.

    An update that changes nothing is a no-op on the API server: no new resourceVersion, no
    watch event, so followers would see no renewal and take over from a leader that thinks
    it renewed.
    """
    if previous is not None and now <= previous:
        return previous + timedelta(microseconds=1)
    return now
