"""The asyncio driver of the election core: it performs the core's actions and nothing else.

Every decision is taken in `sidecar/election/core.py` (pure, simulated in tests/sim/); this
module only turns actions into I/O and answers into events. All events pass through one queue
and are fed to the core one at a time, so nothing is decided on a state an await made stale,
and no wake-up can be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import structlog

from sidecar.election import core
from sidecar.election.core import (
    Answer,
    ElectionCore,
    Event,
    HookKind,
    Outcome,
    Purpose,
    Timings,
    View,
)
from sidecar.election.lock import (
    LeaseLock,
    LockConflict,
    LockError,
    LockForbidden,
    LockNotFound,
)
from sidecar.election.record import VersionedRecord
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role

__all__ = ["Clock", "ElectionObserver", "Elector", "LeadershipHooks", "Resignation", "Timings"]

T = TypeVar("T")
# How long the app's subscribers get to hear "not leader" before the stepping-down hook runs.
DELIVERY_SECONDS = 0.25


class Clock:
    """The two clocks the driver reads; tests replace it to jump the wall clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


class LeadershipHooks(Protocol):
    """Side effects that must happen in order with telling the app (e.g. a Pod label)."""

    async def becoming_leader(self) -> None:
        """After the Lease is won, before the app is told it leads."""

    async def stepping_down(self) -> None:
        """After the app was told it no longer leads, before the Lease is released."""


class ElectionObserver:
    """Told what happened, for metrics and Kubernetes Events (sidecar/metrics.py, events.py).

    Methods run inside the driver: they must return at once and never raise.
    This base class ignores everything.
    """

    def acquired(self, transitions: int) -> None:
        """This replica won the Lease and told the app it leads."""

    def lost(self, reason: str) -> None:
        """This replica told the app it no longer leads."""

    def renewed(self, seconds: float) -> None:
        """A renewal succeeded; it took `seconds` from send to answer."""

    def renew_failed(self, error: BaseException) -> None:
        """A renewal attempt failed with `error` (a LockError or TimeoutError)."""


@dataclass(frozen=True, slots=True)
class Resignation:
    """What `resign()` did: whether this replica led, and whether its release was written."""

    led: bool
    released: bool = False
    error: str | None = None


class Elector:
    def __init__(
        self,
        lock: LeaseLock,
        identity: str,
        timings: Timings,
        broadcaster: Broadcaster,
        lease_name: str,
        namespace: str,
        clock: Clock | None = None,
        hooks: LeadershipHooks | None = None,
        observer: ElectionObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._lock = lock
        self._hooks = hooks
        self._observer = observer or ElectionObserver()
        self.identity = identity
        self.timings = timings
        self._broadcaster = broadcaster
        self._lease_name = lease_name
        self._namespace = namespace
        self._clock = clock or Clock()
        self._core = ElectionCore(identity, timings, rng)
        self._log: Any = structlog.get_logger("elector").bind(
            lease=lock.description, identity=identity
        )
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._resign_waiters: list[asyncio.Future[Resignation]] = []
        self._pumping = False
        self._done = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_hook: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- public

    @property
    def is_leader(self) -> bool:
        return self._core.is_leader(self._clock.monotonic())

    async def run(self) -> None:
        """Campaign, lead, watch, until cancelled. Cancel, then `shutdown()` to release."""
        self._watcher = asyncio.create_task(self._watch(), name="lease-watch")
        try:
            self._feed(core.Start())
            await self._pump(until=None)
        finally:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    def set_eligible(self, eligible: bool, app_health: str) -> None:
        """Join the race (or leave it, resigning if leading) as the app's health changes."""
        self._events.put_nowait(core.SetEligible(eligible, app_health))

    def set_outdated(self, outdated: bool) -> None:
        """A rollout: a ready replica of a newer revision exists (see core.SetOutdated)."""
        self._events.put_nowait(core.SetOutdated(outdated))

    async def resign(self) -> Resignation:
        """Stop leading and release the Lease (the app is told first)."""
        if not self._pumping:
            return Resignation(led=False, released=False)
        waiter: asyncio.Future[Resignation] = asyncio.get_running_loop().create_future()
        self._resign_waiters.append(waiter)
        self._events.put_nowait(core.Resign())
        return await waiter

    async def shutdown(self, timeout: float) -> None:
        """On SIGTERM (after cancelling `run`): tell the app first, then release, within
        `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                self._feed(core.Shutdown())
                await self._pump(until=self._done)
        except TimeoutError:
            self._log.warning("shutdown: the release did not finish in time", timeout=timeout)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._lock.close()

    # ---------------------------------------------------------------- the loop

    async def _pump(self, until: asyncio.Event | None) -> None:
        self._pumping = True
        try:
            while until is None or not until.is_set():
                wake = self._core.wake_at
                event: Event
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

    def _feed(self, event: Event) -> None:
        now = self._clock.monotonic()
        for action in self._core.step(event, now, self._clock.now()):
            self._perform(action, now)

    def _perform(self, action: core.Action, now: float) -> None:
        match action:
            case core.Read(timeout):
                self._spawn(self._read(timeout))
            case core.Create() | core.Update():
                self._spawn(self._write(action))
            case core.RunHook(kind, hook_id, deadline):
                self._last_hook = self._spawn(self._hook(kind, hook_id, deadline, self._last_hook))
            case core.Publish(view):
                self._broadcaster.publish(self._snapshot(view, now))
            case core.Acquired(token):
                self._observer.acquired(token)
            case core.Lost(reason):
                self._observer.lost(reason)
            case core.Resigned(led, released, error):
                if self._resign_waiters:
                    waiter = self._resign_waiters.pop(0)
                    if not waiter.done():
                        waiter.set_result(Resignation(led, released, error))
            case core.Log(level, message, fields):
                getattr(self._log, level)(message, **dict(fields))
            case core.Done():
                self._done.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --------------------------------------------------------------------- I/O

    async def _read(self, timeout: float) -> None:
        answer, _ = await ask(self._lock.get(), timeout, self._log)
        self._events.put_nowait(answer)

    async def _write(self, action: core.Create | core.Update) -> None:
        started = self._clock.monotonic()
        if isinstance(action, core.Create):
            call = self._lock.create(action.record)
        else:
            call = self._lock.update(action.record, action.version)
        answer, error = await ask(call, action.timeout, self._log)
        if action.purpose is Purpose.RENEW:
            if error is None:
                self._observer.renewed(self._clock.monotonic() - started)
            else:
                self._observer.renew_failed(error)
        self._events.put_nowait(answer)

    async def _hook(
        self,
        kind: HookKind,
        hook_id: int,
        deadline: float,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Hooks run one after another, in the order the core asked for them."""

        async def body(remaining: float) -> None:
            if kind is HookKind.STEPPING_DOWN:
                # Let subscribers hear "not leader" before anyone else can win.
                await self._broadcaster.delivered(timeout=min(DELIVERY_SECONDS, remaining))
                if self._hooks is not None:
                    await self._hooks.stepping_down()
            elif self._hooks is not None:
                await self._hooks.becoming_leader()

        try:
            await run_hook(body, previous, deadline, self._clock, self._log.bind(hook=kind.value))
        finally:
            self._events.put_nowait(core.HookDone(hook_id))

    async def _watch(self) -> None:
        """Feed the watch's records to the core; back off when it fails, never spin."""
        backoff = _Backoff(0.1, self.timings.retry_period)
        while True:
            started = time.monotonic()
            error: str | None = None
            try:
                healthy = False
                async for current in self._lock.watch():
                    if not healthy:
                        healthy = True
                        self._events.put_nowait(core.WatchHealth(True))
                    self._events.put_nowait(core.WatchEvent(current))
            except LockError as exc:
                error = str(exc)
            except Exception as exc:  # a bug must not leave us trusting a dead watch
                self._log.exception("watch failed")
                error = f"watch failed: {exc!r}"
            if error is not None:
                self._events.put_nowait(core.WatchHealth(False, error))
            # A watch that worked for a while starts the back-off anew; one that ends at once
            # (garbage, refusals, instant closes) keeps growing it.
            if time.monotonic() - started > self.timings.lease_duration:
                backoff.reset()
            if error is not None or time.monotonic() - started < 1.0:
                await asyncio.sleep(backoff.next())

    # ------------------------------------------------------------- publishing

    def _snapshot(self, view: View, now: float) -> Leadership:
        return leadership_from_view(
            view, self.identity, self._lease_name, self._namespace, now, self._clock.now()
        )


async def run_hook(
    body: Callable[[float], Awaitable[None]],
    previous: asyncio.Task[None] | None,
    deadline: float,
    clock: Clock,
    log: Any,
) -> None:
    """Run a hook after the one before it, until `deadline` (local monotonic); its failure is
    logged, never raised. `body` gets the seconds left."""
    try:
        if previous is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(previous)
        remaining = max(0.0, deadline - clock.monotonic())
        async with asyncio.timeout(remaining):
            await body(remaining)
    except TimeoutError:
        log.warning("hook timed out")
    except Exception as exc:
        log.warning("hook failed", error=str(exc))


async def ask(
    call: Awaitable[VersionedRecord | None], timeout: float, log: Any
) -> tuple[Answer, BaseException | None]:
    """Run one backend call; every way it can end becomes an Answer, never an exception
    (the exception, if any, is handed back for the metrics)."""
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            return Answer(Outcome.OK, await call), None
    except LockConflict as exc:
        return Answer(Outcome.CONFLICT, error=str(exc)), exc
    except LockNotFound as exc:
        return Answer(Outcome.NOT_FOUND, error=str(exc)), exc
    except LockForbidden as exc:
        return Answer(Outcome.FORBIDDEN, error=str(exc), retry_after=exc.retry_after), exc
    except LockError as exc:
        return Answer(Outcome.UNKNOWN, error=str(exc), retry_after=exc.retry_after), exc
    except TimeoutError as exc:
        return Answer(Outcome.UNKNOWN, error="the backend did not answer in time"), exc
    except Exception as exc:  # a backend bug must not end the election
        log.exception("backend call failed unexpectedly")
        return Answer(Outcome.UNKNOWN, error=f"unexpected backend failure: {exc!r}"), exc


def leadership_from_view(
    view: View, identity: str, lease_name: str, namespace: str, now: float, wall: datetime
) -> Leadership:
    """The core's view as the snapshot every API shows (times: local monotonic -> wall)."""
    record = view.record
    until = view.valid_until
    return Leadership(
        identity=identity,
        role=Role(view.role.value),
        leader=view.leader,
        lease=LeaseInfo(
            name=lease_name,
            namespace=namespace,
            transitions=record.lease_transitions if record else None,
            acquire_time=record.acquire_time if record else None,
            renew_time=record.renew_time if record else None,
            duration_seconds=record.lease_duration_seconds if record else None,
        ),
        observed_at=wall,
        valid_until=wall + timedelta(seconds=until - now) if until is not None else None,
        valid_until_monotonic=until,
        fencing_token=view.fencing_token,
        error=view.error,
        ready=view.ready,
        app_health=view.app_health,
    )


class _Backoff:
    def __init__(self, first: float, cap: float) -> None:
        self._first, self._cap, self._next = first, cap, first

    def reset(self) -> None:
        self._next = self._first

    def next(self) -> float:
        delay = self._next * (1.0 + random.random() * 0.5)
        self._next = min(self._next * 2, self._cap)
        return min(delay, self._cap)
