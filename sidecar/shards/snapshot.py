"""What a sharded sidecar tells its app: the shards it owns now (each with its fencing token and
deadline), the members it sees and each shard's holder; and the fan-out to subscribers.

The same rules as leadership.py's Broadcaster: a change of facts (the owned set, a token,
members, holders, error, readiness) wakes subscribers at once; a fresh `valid_until` of an owned
shard at most once per retry period; and when an owned shard's `valid_until` passes without a
renewal, a timer publishes the snapshot without it at that moment. A slow subscriber skips to the
newest snapshot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sidecar.leadership import rfc3339


@dataclass(frozen=True, slots=True)
class OwnedShard:
    shard: int
    fencing_token: int
    valid_until: datetime
    valid_until_monotonic: float = field(compare=False)


@dataclass(frozen=True, slots=True)
class ShardsSnapshot:
    identity: str
    shards: int
    owned: tuple[OwnedShard, ...]
    members: tuple[str, ...]
    assignment: tuple[str, ...]  # each shard's holder as observed ("" when free or unknown)
    desired: tuple[str, ...]  # each shard's owner by the assignment
    observed_at: datetime
    error: str | None = None
    ready: bool = False
    revision: int = 0

    def as_of(self, monotonic_now: float) -> ShardsSnapshot:
        """Never show a shard as owned past its deadline."""
        kept = tuple(o for o in self.owned if monotonic_now < o.valid_until_monotonic)
        if len(kept) == len(self.owned):
            return self
        return replace(self, owned=kept)

    def facts(self) -> tuple[Any, ...]:
        return (
            tuple((o.shard, o.fencing_token) for o in self.owned),
            self.members,
            self.assignment,
            self.desired,
            self.error,
            self.ready,
        )

    def to_dict(self, monotonic_now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if monotonic_now is None else monotonic_now
        view = self.as_of(now)
        return {
            "shards": self.shards,
            "identity": self.identity,
            "owned": [
                {
                    "shard": o.shard,
                    "fencing_token": o.fencing_token,
                    "valid_until": rfc3339(o.valid_until),
                    "valid_for_ms": max(0, int((o.valid_until_monotonic - now) * 1000)),
                }
                for o in view.owned
            ],
            "members": list(self.members),
            "assignment": {str(i): holder for i, holder in enumerate(self.assignment) if holder},
            "desired": {str(i): owner for i, owner in enumerate(self.desired) if owner},
            "observed_at": rfc3339(self.observed_at),
            "error": self.error,
            "ready": self.ready,
        }

    def to_json(self, monotonic_now: float | None = None) -> bytes:
        return json.dumps(self.to_dict(monotonic_now)).encode()


class ShardsBroadcaster:
    def __init__(
        self,
        initial: ShardsSnapshot,
        retry_period: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._current = initial
        self._retry_period = retry_period
        self._clock = clock
        self._sequence = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._subscribers = 0
        self._acked: set[object] = set()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._last_wake = float("-inf")
        self._heartbeat: asyncio.TimerHandle | None = None
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def current(self) -> ShardsSnapshot:
        return self._current

    @property
    def subscribers(self) -> int:
        return self._subscribers

    def publish(self, snapshot: ShardsSnapshot) -> None:
        previous = self._current
        snapshot = snapshot.as_of(self._clock())
        if snapshot.facts() == previous.facts():
            self._current = replace(snapshot, revision=previous.revision)
            deadlines = [o.valid_until_monotonic for o in snapshot.owned]
            if deadlines != [o.valid_until_monotonic for o in previous.owned]:
                self._fresh_validity()
            return
        self._current = replace(snapshot, revision=previous.revision + 1)
        self._wake()

    def relay(self, snapshot: ShardsSnapshot) -> None:
        """Take another broadcaster's snapshot as it is (the gRPC thread's mirror)."""
        self._current = snapshot
        self._wake()

    def close(self) -> None:
        for handle in (self._heartbeat, self._expiry):
            if handle is not None:
                handle.cancel()
        self._heartbeat = self._expiry = None

    async def delivered(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._all_acked.wait()
        except TimeoutError:
            return False
        return True

    async def subscribe(self) -> AsyncGenerator[ShardsSnapshot, None]:
        me = object()
        self._subscribers += 1
        loop = asyncio.get_running_loop()
        try:
            while True:
                sequence = self._sequence
                yield self._current
                if sequence == self._sequence:
                    self._acked.add(me)
                    if len(self._acked) >= self._subscribers:
                        self._all_acked.set()
                    waiter = loop.create_future()
                    self._waiters.add(waiter)
                    try:
                        await waiter
                    finally:
                        self._waiters.discard(waiter)
        finally:
            self._subscribers -= 1
            self._acked.discard(me)
            if len(self._acked) >= self._subscribers:
                self._all_acked.set()

    def _wake(self) -> None:
        self._sequence += 1
        self._last_wake = self._clock()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self._arm_expiry()
        self._acked.clear()
        if self._subscribers:
            self._all_acked.clear()
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fresh_validity(self) -> None:
        self._arm_expiry()
        period = self._retry_period
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or period is None:
            self._wake()
            return
        due = self._last_wake + period - self._clock()
        if due <= 0:
            self._wake()
        elif self._heartbeat is None:
            self._heartbeat = loop.call_later(due, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._heartbeat = None
        self._wake()

    def _arm_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if not self._current.owned:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        deadline = min(o.valid_until_monotonic for o in self._current.owned)
        self._expiry = loop.call_later(max(0.0, deadline - self._clock()), self._expire)

    def _expire(self) -> None:
        self._expiry = None
        current = self._current
        view = current.as_of(self._clock())
        if view is current:
            self._arm_expiry()
            return
        self._current = replace(view, revision=current.revision + 1)
        self._wake()
