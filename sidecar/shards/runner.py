"""The asyncio driver of `ShardedCore`: N shard Leases, the member records, one event queue.

Like election/elector.py, it only performs actions and feeds answers back: every decision is in
sidecar/shards/core.py (and, per shard, sidecar/election/core.py), which the simulation drives.
For tools built for one leader, shard 0 doubles as "the leader": `/leader`, gRPC `Watch`, the
Pod label and `--notify-url` follow shard 0.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from sidecar.election import core
from sidecar.election.core import HookKind, Timings, View
from sidecar.election.elector import (
    DELIVERY_SECONDS,
    Clock,
    LeadershipHooks,
    Resignation,
    _Backoff,
    ask,
    leadership_from_view,
    run_hook,
)
from sidecar.election.lock import (
    LeaseLock,
    LockError,
)
from sidecar.leadership import Broadcaster, Leadership
from sidecar.shards import core as sharded
from sidecar.shards.core import ShardedCore
from sidecar.shards.members import MemberRegistry
from sidecar.shards.snapshot import OwnedShard, ShardsBroadcaster, ShardsSnapshot


class ShardObserver:
    """Told what happened, for metrics; must return at once and never raise."""

    def acquired(self, shard: int, transitions: int) -> None: ...

    def lost(self, shard: int, reason: str) -> None: ...

    def owned(self, count: int) -> None: ...


class ShardRunner:
    def __init__(
        self,
        locks: Sequence[LeaseLock],
        members: MemberRegistry,
        identity: str,
        timings: Timings,
        leader: Broadcaster,
        shards: ShardsBroadcaster,
        lease_names: Sequence[str],
        namespace: str,
        clock: Clock | None = None,
        hooks: LeadershipHooks | None = None,
        observer: ShardObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._locks = list(locks)
        self._members = members
        self.identity = identity
        self.timings = timings
        self._leader = leader
        self._shards = shards
        self._lease_names = list(lease_names)
        self._namespace = namespace
        self._clock = clock or Clock()
        self._hooks = hooks
        self._observer = observer or ShardObserver()
        self._core = ShardedCore(identity, len(self._locks), timings, rng)
        self._log: Any = structlog.get_logger("shards").bind(identity=identity)
        self._events: asyncio.Queue[sharded.ShardedEvent] = asyncio.Queue()
        self._waiters: dict[int, list[asyncio.Future[Resignation]]] = {}
        self._pumping = False
        self._done = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_hook: dict[int, asyncio.Task[None]] = {}
        self._views: list[View | None] = [None] * len(self._locks)
        self._member_error: str | None = None
        self._owned_count = -1
        self._seen: tuple[Any, ...] = ()
        self._withdrawing: asyncio.Task[None] | None = None

    @property
    def shard_count(self) -> int:
        return len(self._locks)

    @property
    def is_leader(self) -> bool:
        """Owns shard 0 (the one the single-leader APIs show)."""
        return self._core.cores[0].is_leader(self._clock.monotonic())

    async def run(self) -> None:
        self._watchers = [
            asyncio.create_task(self._watch_shard(i), name=f"shard-watch-{i}")
            for i in range(self.shard_count)
        ]
        self._watchers.append(asyncio.create_task(self._watch_members(), name="member-watch"))
        try:
            # The app's health as known before the start (unknown: not healthy) goes first,
            # so that an unhealthy replica never announces itself, not even for a moment.
            early: list[sharded.ShardedEvent] = []
            while not self._events.empty():
                event = self._events.get_nowait()
                if isinstance(event, sharded.SetHealthy):
                    self._feed(event)
                else:
                    early.append(event)
            self._feed(core.Start())
            for event in early:
                self._events.put_nowait(event)
            await self._pump(until=None)
        finally:
            for task in self._watchers:
                task.cancel()
            await asyncio.gather(*self._watchers, return_exceptions=True)

    def set_eligible(self, eligible: bool, app_health: str) -> None:
        """The app's health: an unhealthy replica withdraws and hands over every shard."""
        self._events.put_nowait(sharded.SetHealthy(eligible, app_health))

    def set_outdated(self, outdated: bool) -> None:
        """Rollouts do not move shards (balance does); accepted for the app's wiring."""

    async def resign(self) -> Resignation:
        """`/leader/resign`: release shard 0."""
        return await self.release(0)

    async def release(self, shard: int) -> Resignation:
        if not self._pumping or not 0 <= shard < self.shard_count:
            return Resignation(led=False, released=False)
        waiter: asyncio.Future[Resignation] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(shard, []).append(waiter)
        self._events.put_nowait(sharded.ReleaseShard(shard))
        return await waiter

    async def shutdown(self, timeout: float) -> None:
        """Tell the app and release every owned shard, withdraw, within `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                self._feed(core.Shutdown())
                await self._pump(until=self._done)
                # The withdrawal must land too: while others still see this replica as a
                # member, they may wait for it to take back the shards it just released.
                if self._withdrawing is not None:
                    await asyncio.shield(self._withdrawing)
        except TimeoutError:
            self._log.warning("shutdown: the releases did not finish in time", timeout=timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for lock in self._locks:
                await lock.close()
            await self._members.close()

    # ---------------------------------------------------------------- the loop

    async def _pump(self, until: asyncio.Event | None) -> None:
        self._pumping = True
        try:
            while until is None or not until.is_set():
                wake = self._core.wake_at
                event: sharded.ShardedEvent
                try:
                    if wake is None:
                        event = await self._events.get()
                    else:
                        async with asyncio.timeout(max(0.0, wake - self._clock.monotonic())):
                            event = await self._events.get()
                except TimeoutError:
                    event = core.Tick()
                self._feed(event)
        finally:
            self._pumping = False

    def _feed(self, event: sharded.ShardedEvent) -> None:
        now = self._clock.monotonic()
        published = False
        for action in self._core.step(event, now, self._clock.now()):
            self._perform(action, now)
            published = published or (
                isinstance(action, sharded.ShardAction) and isinstance(action.action, core.Publish)
            )
        # Most events (others' renewals) change nothing the app sees: build no snapshot then.
        seen = (
            self._core.live_members,
            self._core.holders,
            self._core.desired,
            self._member_error,
        )
        if published or seen != self._seen:
            self._seen = seen
            self._publish(now)

    def _perform(self, action: sharded.ShardedAction, now: float) -> None:
        match action:
            case sharded.ShardAction(shard, inner):
                self._perform_shard(shard, inner, now)
            case sharded.Announce(record):
                self._spawn(self._member_call(self._members.announce(record), "announce"))
            case sharded.Withdraw():
                self._withdrawing = self._spawn(self._withdraw())
            case sharded.Forget(identity):
                self._log.info("deleting a long-silent member record", member=identity)
                self._spawn(self._member_call(self._members.forget(identity), "forget"))
            case sharded.AllDone():
                self._done.set()

    def _perform_shard(self, shard: int, action: core.Action, now: float) -> None:
        match action:
            case core.Read(timeout):
                self._spawn(self._read(shard, timeout))
            case core.Create() | core.Update():
                self._spawn(self._write(shard, action))
            case core.RunHook(kind, hook_id, deadline):
                previous = self._last_hook.get(shard)
                self._last_hook[shard] = self._spawn(
                    self._hook(shard, kind, hook_id, deadline, previous)
                )
            case core.Publish(view):
                self._views[shard] = view
                if shard == 0:
                    self._leader.publish(self._leadership(view, now))
            case core.Acquired(token):
                self._observer.acquired(shard, token)
            case core.Lost(reason):
                self._observer.lost(shard, reason)
            case core.Resigned(led, released, error):
                waiters = self._waiters.get(shard)
                if waiters:
                    waiter = waiters.pop(0)
                    if not waiter.done():
                        waiter.set_result(Resignation(led, released, error))
            case core.Log(level, message, fields):
                getattr(self._log, level)(message, shard=shard, **dict(fields))
            case core.Done():
                pass

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --------------------------------------------------------------------- I/O

    async def _member_call(self, call: Awaitable[None], what: str) -> None:
        try:
            async with asyncio.timeout(max(self.timings.renew_deadline, 1.0)):
                await call
            self._member_error = None
        except (LockError, TimeoutError) as exc:
            self._member_error = f"member record {what}: {exc or 'timed out'}"
            self._log.warning("member record failed", action=what, error=str(exc))
        except Exception as exc:
            self._member_error = f"member record {what}: {exc!r}"
            self._log.exception("member record failed unexpectedly", action=what)

    async def _withdraw(self) -> None:
        """Delete our member record; a few tries (within the shutdown's time), as others may
        wait for this replica until they see it gone or its record lapses."""
        for attempt in range(3):
            await self._member_call(self._members.withdraw(), "withdraw")
            if self._member_error is None:
                return
            await asyncio.sleep(0.1 * (attempt + 1))

    async def _read(self, shard: int, timeout: float) -> None:
        answer, _ = await ask(self._locks[shard].get(), timeout, self._log)
        self._events.put_nowait(sharded.ShardEvent(shard, answer))

    async def _write(self, shard: int, action: core.Create | core.Update) -> None:
        lock = self._locks[shard]
        if isinstance(action, core.Create):
            call = lock.create(action.record)
        else:
            call = lock.update(action.record, action.version)
        answer, _ = await ask(call, action.timeout, self._log)
        self._events.put_nowait(sharded.ShardEvent(shard, answer))

    async def _hook(
        self,
        shard: int,
        kind: HookKind,
        hook_id: int,
        deadline: float,
        previous: asyncio.Task[None] | None,
    ) -> None:
        async def body(remaining: float) -> None:
            if kind is HookKind.STEPPING_DOWN:
                # The app hears "no longer yours" (streams) before anyone else can win.
                wait = min(DELIVERY_SECONDS, remaining)
                await self._shards.delivered(timeout=wait)
                if shard == 0:
                    await self._leader.delivered(timeout=wait)
                    if self._hooks is not None:
                        await self._hooks.stepping_down()
            elif shard == 0 and self._hooks is not None:
                await self._hooks.becoming_leader()

        log = self._log.bind(hook=kind.value, shard=shard)
        try:
            await run_hook(body, previous, deadline, self._clock, log)
        finally:
            self._events.put_nowait(sharded.ShardEvent(shard, core.HookDone(hook_id)))

    async def _watch_shard(self, shard: int) -> None:
        backoff = _Backoff(0.1, self.timings.retry_period)
        lock = self._locks[shard]
        while True:
            started = time.monotonic()
            error: str | None = None
            try:
                healthy = False
                async for current in lock.watch():
                    if not healthy:
                        healthy = True
                        self._events.put_nowait(sharded.ShardEvent(shard, core.WatchHealth(True)))
                    self._events.put_nowait(sharded.ShardEvent(shard, core.WatchEvent(current)))
            except LockError as exc:
                error = str(exc)
            except Exception as exc:
                self._log.exception("watch failed", shard=shard)
                error = f"watch failed: {exc!r}"
            if error is not None:
                event = core.WatchHealth(False, error)
                self._events.put_nowait(sharded.ShardEvent(shard, event))
            if time.monotonic() - started > self.timings.lease_duration:
                backoff.reset()
            if error is not None or time.monotonic() - started < 1.0:
                await asyncio.sleep(backoff.next())

    async def _watch_members(self) -> None:
        backoff = _Backoff(0.1, self.timings.retry_period)
        while True:
            started = time.monotonic()
            try:
                async for records in self._members.watch():
                    self._member_error = None
                    self._events.put_nowait(sharded.MembersSeen(records))
            except LockError as exc:
                self._member_error = f"member watch: {exc}"
                self._log.warning("member watch failed", error=str(exc))
            except Exception as exc:
                self._member_error = f"member watch: {exc!r}"
                self._log.exception("member watch failed")
            if time.monotonic() - started > self.timings.lease_duration:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    # ------------------------------------------------------------- publishing

    def _publish(self, now: float) -> None:
        wall = self._clock.now()
        members = self._core.members(now)
        owned: list[OwnedShard] = []
        errors: list[str] = []
        ready = True
        for i, election in enumerate(self._core.cores):
            view = self._views[i]
            if view is None or not view.ready:
                ready = False
            if view is not None and view.error:
                errors.append(f"shard {i}: {view.error}")
            if election.is_leader(now):
                current = election.view(now)
                assert current.valid_until is not None and current.fencing_token is not None
                owned.append(
                    OwnedShard(
                        i,
                        current.fencing_token,
                        wall + timedelta(seconds=current.valid_until - now),
                        current.valid_until,
                    )
                )
        if self._member_error:
            errors.insert(0, self._member_error)
        snapshot = ShardsSnapshot(
            identity=self.identity,
            shards=self.shard_count,
            owned=tuple(owned),
            members=tuple(members),
            assignment=self._core.holders,
            desired=self._core.desired,
            observed_at=wall,
            error=errors[0] if errors else None,
            ready=ready,
        )
        self._shards.publish(snapshot)
        if len(owned) != self._owned_count:
            self._owned_count = len(owned)
            self._observer.owned(len(owned))

    def _leadership(self, view: View, now: float) -> Leadership:
        return leadership_from_view(
            view, self.identity, self._lease_names[0], self._namespace, now, self._clock.now()
        )


def initial_snapshot(identity: str, shards: int) -> ShardsSnapshot:
    return ShardsSnapshot(
        identity=identity,
        shards=shards,
        owned=(),
        members=(),
        assignment=("",) * shards,
        desired=("",) * shards,
        observed_at=datetime.now(UTC),
    )
