"""What the sidecar knows, as immutable snapshots, and the fan-out of them to subscribers.

The elector is the only writer. Readers (HTTP, gRPC, logs) take `Broadcaster.current` or
subscribe; a subscriber that falls behind skips to the newest snapshot, so nobody can slow the
elector down or make another subscriber wait.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any


class Role(enum.StrEnum):
    LEADER = "leader"
    FOLLOWER = "follower"
    UNKNOWN = "unknown"  # no fresh observation: starting, or the backend is unreachable


def rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    revision: int = 0  # grows with every change that subscribers are told about
    valid_until_monotonic: float | None = field(default=None, compare=False, repr=False)
    _json: bytes = field(default=b"", compare=False, repr=False)

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def as_of(self, monotonic_now: float) -> Leadership:
        """Never show leadership past its deadline, even if the elector is late to say so."""
        deadline = self.valid_until_monotonic
        if self.is_leader and deadline is not None and monotonic_now >= deadline:
            return replace(
                self, role=Role.UNKNOWN, leader="", valid_until=None, fencing_token=None, _json=b""
            )
        return self

    def same_facts(self, other: Leadership) -> bool:
        """True when only times moved (a renewal): subscribers are not woken for that."""
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

    def to_dict(self) -> dict[str, Any]:
        lease = self.lease
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
        }

    def to_json(self) -> bytes:
        """Serialised once per snapshot, however many clients read it."""
        if not self._json:
            object.__setattr__(self, "_json", json.dumps(self.to_dict()).encode())
        return self._json


class Broadcaster:
    """Latest-value fan-out: one future per revision, resolved for all waiters at once."""

    def __init__(self, initial: Leadership) -> None:
        self._current = initial
        self._next: asyncio.Future[Leadership] | None = None
        self._subscribers = 0
        self._acked: set[object] = set()  # subscribers done with the current revision
        self._all_acked = asyncio.Event()
        self._all_acked.set()

    @property
    def current(self) -> Leadership:
        return self._current

    @property
    def subscribers(self) -> int:
        return self._subscribers

    def publish(self, snapshot: Leadership) -> Leadership:
        """Make `snapshot` current; wake subscribers only when a fact changed."""
        previous = self._current
        if snapshot.same_facts(previous):
            self._current = replace(snapshot, revision=previous.revision, _json=b"")
            return self._current
        self._current = replace(snapshot, revision=previous.revision + 1, _json=b"")
        self._acked.clear()
        if self._subscribers:
            self._all_acked.clear()
        waiter, self._next = self._next, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._current)
        return self._current

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
        """The current snapshot at once, then each newer one (intermediate ones may be skipped)."""
        me = object()
        self._subscribers += 1
        try:
            while True:
                last = self._current
                yield last
                # The consumer asked for more, so it has handled `last`.
                if last.revision == self._current.revision:
                    self._acked.add(me)
                    if len(self._acked) >= self._subscribers:
                        self._all_acked.set()
                    if self._next is None:
                        self._next = asyncio.get_running_loop().create_future()
                    await asyncio.shield(self._next)
        finally:
            self._subscribers -= 1
            self._acked.discard(me)
            if len(self._acked) >= self._subscribers:
                self._all_acked.set()
