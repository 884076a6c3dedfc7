"""Leadership snapshots (what the sidecar knows, immutable) and their fan-out to subscribers.

The elector is the only writer: it publishes a new `Leadership` at every change and after
every renewal. Readers (HTTP, gRPC, notify, metrics) take `Broadcaster.current` or subscribe.

What wakes subscribers (SSE and gRPC streams, the status page, --notify-url):
- a change of facts (role, leader, fencing token, error, readiness, app health): at once;
- a fresh `valid_until` on a leader after renewals: coalesced, at most one message per retry
  period and never more than one retry period behind the newest renewal, so a stream client
  can obey "never past valid_until" literally. Followers have no `valid_until`: renewals they
  observe wake nobody;
- `valid_until` passing without a renewal: a timer here (not the election loop) publishes the
  "not leader" view at that moment, even if the elector is late to say so.

A subscriber that falls behind skips to the newest snapshot, so nobody can slow the elector
down or make another subscriber wait.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sidecar.election.record import format_microtime


class Role(enum.StrEnum):
    LEADER = "leader"
    FOLLOWER = "follower"
    UNKNOWN = "unknown"  # no fresh observation: starting, or the backend is unreachable


def rfc3339(moment: datetime | None) -> str | None:
    """Times in the API: UTC, six fractional digits, `Z` (as the Lease's MicroTime)."""
    return None if moment is None else format_microtime(moment)


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    name: str
    namespace: str
    transitions: int | None = None
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    duration_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Leadership:
    """One observation of the election, as every API shows it."""

    identity: str
    role: Role
    leader: str  # the holder's identity; "" when there is none or it is unknown
    lease: LeaseInfo
    observed_at: datetime
    valid_until: datetime | None = None  # leader only: act as leader until then, no longer
    fencing_token: int | None = None
    error: str | None = None  # why the backend cannot be used right now
    ready: bool = False  # the first observation is done
    app_health: str | None = None  # "healthy"/"unhealthy"/"unknown" with --app-health-url
    revision: int = 0  # grows with every change of facts (not with renewals)
    valid_until_monotonic: float | None = field(default=None, compare=False, repr=False)
    # The JSON without its closing `valid_for_ms` member: built once, spliced per answer.
    _json_head: bytes = field(default=b"", compare=False, repr=False)

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def as_of(self, monotonic_now: float) -> Leadership:
        """Never show leadership past its deadline, even if the elector is late to say so."""
        deadline = self.valid_until_monotonic
        if self.is_leader and deadline is not None and monotonic_now >= deadline:
            return replace(
                self,
                role=Role.UNKNOWN,
                leader="",
                valid_until=None,
                valid_until_monotonic=None,
                fencing_token=None,
                _json_head=b"",
            )
        return self

    def valid_for_ms(self, monotonic_now: float) -> int | None:
        """Leader only: the remaining validity in whole milliseconds (rounded down), for
        clients whose wall clock differs from this machine's."""
        deadline = self.valid_until_monotonic
        if not self.is_leader or deadline is None:
            return None
        return max(0, int((deadline - monotonic_now) * 1000))

    def same_facts(self, other: Leadership) -> bool:
        """True when only times moved (a renewal)."""
        return (
            self.role,
            self.leader,
            self.fencing_token,
            self.error,
            self.ready,
            self.app_health,
        ) == (
            other.role,
            other.leader,
            other.fencing_token,
            other.error,
            other.ready,
            other.app_health,
        )

    def to_dict(self, monotonic_now: float | None = None) -> dict[str, Any]:
        lease = self.lease
        now = time.monotonic() if monotonic_now is None else monotonic_now
        return {
            "name": self.leader,
            "identity": self.identity,
            "is_leader": self.is_leader,
            "state": self.role.value,
            "valid_until": rfc3339(self.valid_until),
            "fencing_token": self.fencing_token,
            "observed_at": rfc3339(self.observed_at),
            "lease": {
                "name": lease.name,
                "namespace": lease.namespace,
                "transitions": lease.transitions,
                "acquire_time": rfc3339(lease.acquire_time),
                "renew_time": rfc3339(lease.renew_time),
                "duration_seconds": lease.duration_seconds,
            },
            "error": self.error,
            "app_health": self.app_health,
            "valid_for_ms": self.valid_for_ms(now),
        }

    def to_json(self, monotonic_now: float | None = None) -> bytes:
        """The `/leader` JSON. Everything but `valid_for_ms` is serialised once per snapshot,
        however many clients read it; `valid_for_ms` is the remaining validity at `monotonic_now`
        (default: now), so one snapshot answers correctly for as long as it is current."""
        head = self._json_head
        if not head:
            body = self.to_dict(0.0)
            del body["valid_for_ms"]
            head = json.dumps(body).encode()[:-1] + b', "valid_for_ms": '
            object.__setattr__(self, "_json_head", head)
        if not self.is_leader or self.valid_until_monotonic is None:
            return head + b"null}"
        now = time.monotonic() if monotonic_now is None else monotonic_now
        return b"%s%d}" % (head, max(0, int((self.valid_until_monotonic - now) * 1000)))


class Broadcaster:
    """Latest-value fan-out: every waiting subscriber is woken at once and reads `current`.

    `retry_period` bounds how often a leader's fresh `valid_until` wakes subscribers (None:
    at every renewal). `clock` is the monotonic clock the snapshots' deadlines are on.
    """

    def __init__(
        self,
        initial: Leadership,
        retry_period: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._current = initial
        self._retry_period = retry_period
        self._clock = clock
        self._sequence = 0  # grows with every wake-up (facts, fresh validity, expiry)
        self._waiters: set[asyncio.Future[None]] = set()
        self._subscribers = 0
        self._acked: set[object] = set()  # subscribers done with the current sequence
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._last_wake = float("-inf")
        self._woken_deadline: float | None = None  # the valid_until subscribers last got
        self._heartbeat: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def current(self) -> Leadership:
        return self._current

    @property
    def subscribers(self) -> int:
        return self._subscribers

    def publish(self, snapshot: Leadership) -> Leadership:
        """Make `snapshot` current; wake subscribers as the module docstring says."""
        previous = self._current
        snapshot = snapshot.as_of(self._clock())  # a late publisher never revives a leader
        if snapshot.same_facts(previous):
            self._current = replace(snapshot, revision=previous.revision, _json_head=b"")
            if (
                snapshot.is_leader
                and snapshot.valid_until_monotonic != previous.valid_until_monotonic
            ):
                self._fresh_validity()
            return self._current
        self._current = replace(snapshot, revision=previous.revision + 1, _json_head=b"")
        self._wake()
        return self._current

    def relay(self, snapshot: Leadership) -> None:
        """Make `snapshot` current as it is and wake every subscriber: for a mirror of another
        Broadcaster (on another event loop), which decided already what deserves a message."""
        self._current = snapshot
        self._wake(arm=False)

    def close(self) -> None:
        """Stop the timers (at shutdown)."""
        for handle in (self._heartbeat, self._expiry):
            if handle is not None:
                handle.cancel()
        self._heartbeat = self._expiry = None

    async def delivered(self, timeout: float) -> bool:
        """Wait until every subscriber has handled the current snapshot (at most `timeout`).

        The elector calls this between telling the app it lost leadership and releasing the
        Lease, so that the app hears "not leader" before anyone else can win.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._all_acked.wait()
        except TimeoutError:
            return False
        return True

    async def subscribe(self) -> AsyncGenerator[Leadership, None]:
        """The current snapshot at once, then each newer one (intermediate ones may be skipped).

        Asking for the next snapshot is what tells `delivered()` this subscriber handled the
        previous one.
        """
        with self.subscription() as subscription:
            while True:
                yield await subscription.next()

    def subscription(self) -> Subscription:
        """The same as `subscribe()` without an async generator around it (the gRPC fan-out
        path, where every step counts a thousand times): `with` it, then `await next()`."""
        return Subscription(self)

    def _join(self) -> None:
        self._subscribers += 1

    def _leave(self, who: object) -> None:
        self._subscribers -= 1
        self._acked.discard(who)
        if len(self._acked) >= self._subscribers:
            self._all_acked.set()

    async def _after(self, who: object, sequence: int) -> None:
        """Note that `who` handled `sequence`; wait until there is something newer."""
        if sequence != self._sequence:
            return
        self._acked.add(who)
        if len(self._acked) >= self._subscribers:
            self._all_acked.set()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    # ------------------------------------------------------------------ wake-ups

    def _wake(self, arm: bool = True) -> None:
        self._sequence += 1
        self._last_wake = self._clock()
        self._woken_deadline = self._current.valid_until_monotonic
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if arm:
            self._arm_expiry()
        self._acked.clear()
        if self._subscribers:
            self._all_acked.clear()
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fresh_validity(self) -> None:
        """A renewal moved the leader's deadline: tell subscribers, at most once per period."""
        loop = _running_loop()
        period = self._retry_period
        if loop is None or period is None:
            self._wake()
            return
        self._arm_expiry()  # the later deadline, even before subscribers hear of it
        due = self._last_wake + period - self._clock()
        if due <= 0:
            self._wake()
        elif self._heartbeat is None:
            self._heartbeat = loop.call_later(due, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._heartbeat = None
        current = self._current
        if current.is_leader and current.valid_until_monotonic != self._woken_deadline:
            self._wake()

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        deadline = self._current.valid_until_monotonic
        loop = _running_loop()
        if loop is None or deadline is None or not self._current.is_leader:
            return
        # call_later, not call_at: an event loop's own clock (uvloop's) may not be ours.
        self._expiry = loop.call_later(max(0.0, deadline - self._clock()), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        current = self._current
        view = current.as_of(self._clock())
        if view is current:  # woke a hair early, or a renewal moved the deadline
            self._arm_expiry()
            return
        self._current = replace(view, revision=current.revision + 1)
        self._wake()


class Subscription:
    """One subscriber of a Broadcaster: `next()` returns the current snapshot the first time,
    then waits for a newer one (telling the Broadcaster this one was handled)."""

    __slots__ = ("_broadcaster", "_sequence")

    def __init__(self, broadcaster: Broadcaster) -> None:
        self._broadcaster = broadcaster
        self._sequence: int | None = None

    def __enter__(self) -> Subscription:
        self._broadcaster._join()
        return self

    def __exit__(self, *exc: object) -> None:
        self._broadcaster._leave(self)

    async def newer(self) -> None:
        """Wait until a snapshot newer than the last one `next()` returned exists, without
        telling the Broadcaster that one was handled."""
        broadcaster = self._broadcaster
        if self._sequence != broadcaster._sequence:
            return
        waiter = asyncio.get_running_loop().create_future()
        broadcaster._waiters.add(waiter)
        try:
            await waiter
        finally:
            broadcaster._waiters.discard(waiter)

    async def next(self) -> Leadership:
        broadcaster = self._broadcaster
        if self._sequence is not None:
            await broadcaster._after(self, self._sequence)
        self._sequence = broadcaster._sequence
        return broadcaster._current


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
