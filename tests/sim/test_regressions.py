"""Each bug the review found in the old elector, replayed step by step against the core.

A `Script` feeds one core the exact events of the failure, at chosen local times, and looks at
what the core does. The numbers in the names are the bugs' numbers in issue 10.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sidecar.election import core
from sidecar.election.core import Answer, ElectionCore, Outcome, Purpose, Timings
from sidecar.election.record import LeaderRecord, VersionedRecord

T = Timings(lease_duration=15.0, renew_deadline=10.0, retry_period=2.0)
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass
class Script:
    identity: str = "a"
    now: float = 100.0
    machine: ElectionCore = field(init=False)
    actions: list[core.Action] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.machine = ElectionCore(self.identity, T)

    def step(self, event: core.Event, after: float = 0.0) -> list[core.Action]:
        self.now += after
        out = self.machine.step(event, self.now, EPOCH + timedelta(seconds=self.now))
        self.actions.extend(out)
        return out

    def tick_until(self, until: float) -> list[core.Action]:
        """Ticks at every wake-up the core asks for, up to `until` (local time)."""
        out: list[core.Action] = []
        while (wake := self.machine.wake_at) is not None and wake <= until:
            self.now = wake
            out += self.step(core.Tick())
        self.now = max(self.now, until)
        return out

    def requests(self, actions: list[core.Action]) -> list[core.Read | core.Create | core.Update]:
        return [a for a in actions if isinstance(a, core.Read | core.Create | core.Update)]

    def writes(self) -> list[LeaderRecord]:
        return [a.record for a in self.actions if isinstance(a, core.Create | core.Update)]

    def start(self, current: VersionedRecord | None) -> list[core.Action]:
        """Start with a working watch; the start-up read answers `current`."""
        self.step(core.Start())
        self.step(core.WatchHealth(True))
        return self.step(Answer(Outcome.OK, current))

    def lead(self, transitions: int = 4) -> VersionedRecord:
        """Become leader by taking over a released record (no creation wait)."""
        released = VersionedRecord(LeaderRecord("", 1, EPOCH, EPOCH, transitions - 1), "v1")
        self.step(core.Start())
        self.step(core.WatchHealth(True))
        self.step(core.WatchEvent(released))
        out = self.step(Answer(Outcome.OK, released))  # the start-up read
        (acquire,) = self.requests(out)
        assert isinstance(acquire, core.Update) and acquire.purpose is Purpose.ACQUIRE
        won = VersionedRecord(acquire.record, "v2")
        out = self.step(Answer(Outcome.OK, won), after=0.01)
        (hook,) = [a for a in out if isinstance(a, core.RunHook)]
        self.step(core.HookDone(hook.hook_id), after=0.01)
        assert self.machine.is_leader(self.now)
        return won


def intruder(on: VersionedRecord, version: str) -> VersionedRecord:
    record = on.record
    return VersionedRecord(
        LeaderRecord("x", 15, EPOCH, EPOCH, record.lease_transitions + 1), version
    )


def test_1_a_failed_renewal_then_an_intruder_never_renews_the_intruders_record() -> None:
    s = Script()
    won = s.lead()
    (renew,) = s.requests(s.tick_until(s.now + T.retry_period))
    assert isinstance(renew, core.Update) and renew.purpose is Purpose.RENEW
    # The renewal fails (503) while "x" takes the Lease.
    out = s.step(Answer(Outcome.UNKNOWN, error="503"), after=0.05)
    taken = intruder(won, "v9")
    out += s.tick_until(s.now + 2.0)
    (read,) = s.requests(out)
    assert isinstance(read, core.Read)  # it reads before it writes again
    out = s.step(Answer(Outcome.OK, taken), after=0.01)
    assert not s.machine.is_leader(s.now)
    assert any(isinstance(a, core.Lost) for a in out)
    s.tick_until(s.now + 30)
    assert all(w.holder_identity in ("a", "") for w in s.writes())


def test_2_a_lease_deleted_under_a_quiet_watch_is_put_back_by_its_leader() -> None:
    s = Script()
    s.lead()
    s.tick_until(s.now + T.retry_period)
    out = s.step(Answer(Outcome.NOT_FOUND, error="deleted"), after=0.01)
    out += s.tick_until(s.now + 1)
    (read,) = s.requests(out)
    assert isinstance(read, core.Read)
    out = s.step(Answer(Outcome.OK, None), after=0.01)
    (create,) = s.requests(out)
    assert isinstance(create, core.Create) and create.purpose is Purpose.RECREATE
    assert create.record.holder_identity == "a" and create.record.lease_transitions == 4
    s.step(Answer(Outcome.OK, VersionedRecord(create.record, "w1")), after=0.01)
    assert s.machine.is_leader(s.now)  # the same term goes on


def test_3_an_unexpected_answer_is_an_error_that_is_retried_not_a_crash() -> None:
    s = Script()
    s.step(core.Start())
    out = s.step(Answer(Outcome.UNKNOWN, error="200 text/html: <html>sign in</html>"))
    view = s.machine.view(s.now)
    assert view.role is core.Role.UNKNOWN and view.error is not None and "html" in view.error
    out = s.tick_until(s.now + T.retry_period)
    assert any(isinstance(a, core.Read) for a in out)  # retried with back-off


def test_4_rewound_versions_are_just_versions_and_conflicts_back_off() -> None:
    s = Script()
    won = s.lead()
    s.tick_until(s.now + T.retry_period)
    s.step(Answer(Outcome.OK, VersionedRecord(won.record, "900")), after=0.01)
    # An etcd restore: the record is the same, its version far lower.
    s.step(core.WatchEvent(VersionedRecord(won.record, "12")), after=0.1)
    out = s.tick_until(s.now + T.retry_period)
    renewals = [a for a in s.requests(out) if isinstance(a, core.Update)]
    assert renewals and renewals[0].version == "900"  # only fresh answers give versions
    out = s.step(Answer(Outcome.CONFLICT), after=0.01)
    (read,) = s.requests(out)  # a conflict: read first
    assert isinstance(read, core.Read)
    out = s.step(Answer(Outcome.OK, VersionedRecord(renewals[0].record, "13")), after=0.01)
    out += s.tick_until(s.now + T.retry_period)
    assert any(isinstance(a, core.Update) and a.version == "13" for a in out)
    assert s.machine.is_leader(s.now)


def test_4_a_candidate_that_loses_a_race_waits_a_retry_period_before_writing_again() -> None:
    s = Script(identity="b")
    released = VersionedRecord(LeaderRecord("", 1, EPOCH, EPOCH, 2), "v1")
    out = s.start(released)
    assert any(isinstance(a, core.Update) for a in out)
    out = s.step(Answer(Outcome.CONFLICT), after=0.01)
    (read,) = s.requests(out)
    assert isinstance(read, core.Read)
    s.step(Answer(Outcome.OK, released), after=0.01)  # free again (a label change)
    before = len(s.writes())
    s.tick_until(s.now + T.retry_period * 0.99)
    assert len(s.writes()) == before


def test_5_retry_after_is_honoured() -> None:
    s = Script()
    s.step(core.Start())
    s.step(Answer(Outcome.UNKNOWN, error="429", retry_after=5.0))
    assert not s.requests(s.tick_until(s.now + 4.9))
    assert s.requests(s.tick_until(s.now + 0.2))


def test_5_retry_after_is_capped_by_the_renew_deadline() -> None:
    s = Script()
    s.step(core.Start())
    s.step(Answer(Outcome.UNKNOWN, error="429", retry_after=3600.0))
    assert s.requests(s.tick_until(s.now + T.renew_deadline + 0.1))


def test_7_a_deletion_seen_during_a_renewal_is_acted_on_at_the_answer() -> None:
    s = Script()
    s.lead()
    s.tick_until(s.now + T.retry_period)  # a renewal in flight
    assert not s.requests(s.step(core.WatchEvent(None), after=0.01))  # one request at a time
    out = s.step(Answer(Outcome.OK, VersionedRecord(s.writes()[-1], "v3")), after=0.01)
    (read,) = s.requests(out)  # no lost wake-up: it checks at the answer
    assert isinstance(read, core.Read)


def test_7_a_leaders_read_times_out_with_its_remaining_validity() -> None:
    s = Script()
    s.lead()
    (read,) = s.requests(s.step(core.WatchEvent(None), after=1.5))
    assert isinstance(read, core.Read)
    assert read.timeout < T.renew_deadline - 1.4


def test_8_an_acquisition_uses_the_version_it_decided_on() -> None:
    s = Script(identity="b")
    held = VersionedRecord(LeaderRecord("a", 15, EPOCH, EPOCH, 1), "v1")
    s.start(held)
    renewed = VersionedRecord(LeaderRecord("a", 15, EPOCH, EPOCH + timedelta(1), 1), "v2")
    s.step(core.WatchEvent(renewed), after=5)
    out = s.tick_until(s.now + 14.9)
    assert not s.writes()  # the renewal restarted the count
    out = s.tick_until(s.now + 0.2)
    (take,) = s.requests(out)
    assert isinstance(take, core.Update) and take.version == "v2"


def test_9_a_record_with_our_name_from_another_process_is_waited_out() -> None:
    s = Script(identity="a")
    ours_by_name = VersionedRecord(LeaderRecord("a", 15, EPOCH, EPOCH, 6), "v1")
    s.start(ours_by_name)
    assert not s.writes()
    assert not s.requests(s.tick_until(s.now + 14.9))
    out = s.tick_until(s.now + 0.2)
    (take,) = s.requests(out)
    assert isinstance(take, core.Update)
    assert take.record.lease_transitions == 7  # a new term: a new fencing token


def test_the_app_hears_not_leader_before_the_release_is_sent() -> None:
    s = Script()
    s.lead()
    out = s.step(core.Resign(), after=0.5)
    kinds = [type(a).__name__ for a in out]
    assert kinds.index("Publish") < kinds.index("RunHook")
    assert not s.requests(out)  # nothing released before the hook answered
    (hook,) = [a for a in out if isinstance(a, core.RunHook)]
    assert hook.kind is core.HookKind.STEPPING_DOWN
    out = s.step(core.HookDone(hook.hook_id), after=0.1)
    (release,) = s.requests(out)
    assert isinstance(release, core.Update) and release.record.holder_identity == ""
    out = s.step(Answer(Outcome.OK, VersionedRecord(release.record, "v5")), after=0.01)
    assert core.Resigned(led=True, released=True) in out


def test_a_created_lease_is_led_only_after_one_lease_duration() -> None:
    s = Script()
    s.start(None)
    out = s.tick_until(s.now + T.retry_period * 1.3)
    (create,) = s.requests(out)
    assert isinstance(create, core.Create) and create.purpose is Purpose.ACQUIRE
    created_at = s.now + 0.01
    s.step(Answer(Outcome.OK, VersionedRecord(create.record, "v1")), after=0.01)
    leading_at = None
    for _ in range(200):
        out = s.tick_until(s.now + 0.5)
        for action in out:
            if isinstance(action, core.Update):
                s.step(Answer(Outcome.OK, VersionedRecord(action.record, f"v{s.now}")))
            if isinstance(action, core.RunHook):
                s.step(core.HookDone(action.hook_id))
        if s.machine.is_leader(s.now):
            leading_at = s.now
            break
    assert leading_at is not None and leading_at - created_at >= T.lease_duration
