"""The election state machine: candidate <-> leader over one LeaseLock.

Rules (client-go's, plus a watch instead of polling):
- Expiry is judged on this process's monotonic clock from the moment it saw the record change,
  using the record's own `leaseDurationSeconds`; remote wall clocks are never compared.
- The leader renews every retry period and stops claiming leadership as soon as
  `renew_deadline` has passed since the send time of its last successful write.
- Every write carries the version read before it; a conflict means someone else wrote: re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import structlog

from sidecar.election.lock import LeaseLock, LockConflict, LockError, LockForbidden
from sidecar.election.record import LeaderRecord, VersionedRecord
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Timings:
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


@dataclass(frozen=True, slots=True)
class Resignation:
    """What `Elector.resign()` did.

    led: this replica led when asked (False: nothing was done; HTTP 409, gRPC
    FAILED_PRECONDITION). released: the release write landed (HTTP 200). error: why the Lease
    was not released (HTTP 503, gRPC UNAVAILABLE); the replica stepped down all the same, and
    others take over once the lease lapses.
    """

    led: bool
    released: bool = False
    error: str | None = None


class Clock:
    """The two clocks the elector reads; tests replace it to jump the wall clock."""

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

    Methods run inside the elector's decisions: they must return at once and never raise.
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
        self._log: Any = structlog.get_logger("elector").bind(
            lease=lock.description, identity=identity
        )
        self._observed: VersionedRecord | None = None
        self._deleted: LeaderRecord | None = None  # the last record before a deletion
        self._observed_at = 0.0  # monotonic time the record last changed, as seen here
        self._have_observation = False
        self._watch_healthy = False
        self._leading = False
        self._valid_until = 0.0  # monotonic; meaningful while leading
        self._last_renew = 0.0
        self._error: str | None = None  # the last read or write failed: we know nothing
        self._watch_error: str | None = None  # the watch fails; reads may still work
        self._sit_out_until = 0.0  # after a resign, let someone else win first
        self._changed = asyncio.Event()
        self._writing = asyncio.Lock()  # one write at a time: renew, acquire and release race
        self._eligible = True  # False while the app is unhealthy: stay out of the race
        self._app_health: str | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- public

    @property
    def is_leader(self) -> bool:
        return self._leading and self._clock.monotonic() < self._valid_until

    async def run(self) -> None:
        """Campaign, lead, watch, until cancelled. Cancel, then `shutdown()` to release."""
        self._publish()
        watcher = asyncio.create_task(self._watch_loop(), name="lease-watch")
        try:
            while True:
                if self._leading:
                    await self._lead_once()
                else:
                    await self._campaign_once()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    def set_eligible(self, eligible: bool, app_health: str) -> None:
        """Join the race (or leave it, resigning if leading) as the app's health changes."""
        if eligible != self._eligible:
            self._log.info("eligibility changed", eligible=eligible, app_health=app_health)
        self._eligible = eligible
        self._app_health = app_health
        self._publish()
        self._changed.set()

    async def resign(self) -> Resignation:
        """Stop leading and release the Lease (see `Resignation`)."""
        if not self._leading:
            return Resignation(led=False)
        self._sit_out_until = self._clock.monotonic() + self._observed_duration()
        error = await self._step_down_and_release("resigned")
        return Resignation(led=True, released=error is None, error=error)

    async def shutdown(self, timeout: float) -> None:
        """On SIGTERM: tell the app first, then release, within `timeout` seconds."""
        if self._leading:
            await self._step_down_and_release("shutdown", timeout=timeout)
        await self._lock.close()

    # ------------------------------------------------------------- observing

    def _observe(self, current: VersionedRecord | None) -> None:
        """Note what the backend holds now; restart the expiry clock if the record changed."""
        previous = self._observed
        if (
            current is not None
            and previous is not None
            and _older(current.version, previous.version)
        ):
            return  # a late watch event for something we already saw
        record_changed = (current is None) != (previous is None) or (
            current is not None and previous is not None and current.record != previous.record
        )
        if current is None and previous is not None:
            # Deleted (by an operator?). Its holder may still act until its deadline, so the
            # deleted record keeps counting down as if it were still there: nobody may create
            # a new Lease before the old term would have lapsed.
            self._deleted = previous.record
        elif current is not None:
            self._deleted = None
        if (record_changed and current is not None) or not self._have_observation:
            self._observed_at = self._clock.monotonic()
            new_holder = current.record.holder_identity if current else ""
            old_holder = previous.record.holder_identity if previous else ""
            if new_holder != old_holder and new_holder and new_holder != self.identity:
                self._log.info(
                    "observed new leader",
                    leader=new_holder,
                    transitions=current.record.lease_transitions if current else None,
                )
        self._observed = current
        self._have_observation = True
        self._set_error(None)
        self._changed.set()

    async def _watch_loop(self) -> None:
        backoff = _Backoff(0.1, self.timings.retry_period)
        while True:
            try:
                async for current in self._lock.watch():
                    self._watch_healthy = True
                    self._set_watch_error(None)
                    backoff.reset()
                    self._observe(current)
                    self._publish()
            except LockError as exc:
                self._set_watch_error(str(exc))
            except Exception as exc:  # a bug must not leave us trusting a dead watch
                self._log.exception("watch failed")
                self._set_watch_error(f"watch failed: {exc!r}")
            self._watch_healthy = False
            self._publish()
            self._changed.set()  # let the campaign fall back to reading the record itself
            await asyncio.sleep(backoff.next())

    def _record(self) -> LeaderRecord | None:
        """The record that governs the election: the observed one, or the deleted one."""
        return self._observed.record if self._observed else self._deleted

    def _holder(self) -> str:
        record = self._record()
        return record.holder_identity if record else ""

    def _observed_duration(self) -> float:
        record = self._record()
        seconds = record.lease_duration_seconds if record else 0
        return float(seconds) if seconds > 0 else self.timings.lease_duration

    def _expires_at(self) -> float:
        """Monotonic moment the observed holder's lease lapses if nothing changes."""
        return self._observed_at + self._observed_duration()

    def _held_by_other(self) -> bool:
        holder = self._holder()
        return (
            bool(holder)
            and holder != self.identity
            and self._clock.monotonic() < self._expires_at()
        )

    # ------------------------------------------------------------ candidate

    async def _campaign_once(self) -> None:
        needs_read = not self._watch_healthy or not self._have_observation
        if needs_read and not await self._refresh():
            await self._wait_for_change(self._jittered(self.timings.retry_period))
            return
        now = self._clock.monotonic()
        if self._held_by_other():
            timeout = self._expires_at() - now
            if not self._watch_healthy:
                timeout = min(timeout, self._jittered(self.timings.retry_period))
            await self._wait_for_change(timeout)
            self._publish()  # the holder may have lapsed meanwhile
            return
        if now < self._sit_out_until:
            await self._wait_for_change(self._sit_out_until - now)
            return
        if not self._eligible:
            await self._wait_for_change(self._jittered(self.timings.retry_period))
            return
        async with self._writing:
            await self._try_acquire()

    async def _refresh(self) -> bool:
        try:
            current = await _within(self._lock.get(), self._request_timeout())
        except (LockError, TimeoutError) as exc:
            self._set_error(_describe(exc))
            self._publish()
            return False
        self._observe(current)
        self._publish()
        return True

    async def _try_acquire(self) -> None:
        observed = self._observed
        sent = self._clock.monotonic()
        now = self._clock.now()
        duration = round(self.timings.lease_duration)
        try:
            if observed is None:
                # After a deletion, continue the count so that fencing tokens keep growing.
                transitions = self._deleted.lease_transitions + 1 if self._deleted else 0
                record = LeaderRecord(self.identity, duration, now, now, transitions)
                result = await _within(self._lock.create(record), self._request_timeout())
            else:
                old = observed.record
                ours = old.holder_identity == self.identity
                record = LeaderRecord(
                    holder_identity=self.identity,
                    lease_duration_seconds=duration,
                    acquire_time=old.acquire_time if ours else now,
                    renew_time=_after(old.renew_time, now),
                    lease_transitions=old.lease_transitions if ours else old.lease_transitions + 1,
                )
                result = await _within(
                    self._lock.update(record, observed.version), self._request_timeout()
                )
        except LockConflict:
            # Someone else wrote first: that is an election lost, not an error.
            self._log.debug("acquire conflict")
            await self._refresh()
            return
        except (LockError, TimeoutError) as exc:
            self._set_error(_describe(exc))
            self._publish()
            await self._wait_for_change(self._jittered(self.timings.retry_period))
            return
        self._observe(result)
        self._last_renew = sent
        self._valid_until = sent + self.timings.renew_deadline
        if self._hooks is not None:
            await self._run_hook(self._hooks.becoming_leader(), self._valid_until)
        self._leading = True
        self._log.info("acquired", transitions=result.record.lease_transitions)
        self._publish()
        self._observer.acquired(result.record.lease_transitions)

    # --------------------------------------------------------------- leader

    async def _lead_once(self) -> None:
        next_renew = self._last_renew + self.timings.retry_period
        # Sleep until the next renewal, but wake for a foreign write or deletion.
        await self._wait_for_change(next_renew - self._clock.monotonic())
        if not self._eligible:
            await self._step_down_and_release("the app is unhealthy")
            return
        if self._observed is None:
            # The watch's first read can race our own create: re-read before believing it.
            still_ours = await self._refresh() and self._observed is not None
            if not (still_ours and self._holder() == self.identity):
                self._lose("the Lease was deleted")
                return
        if self._holder() != self.identity:
            self._lose("the Lease was taken by someone else")
            return
        if self._clock.monotonic() < next_renew:
            return
        async with self._writing:
            await self._renew()

    async def _renew(self) -> None:
        while self._leading:
            remaining = self._valid_until - self._clock.monotonic()
            if remaining <= 0:
                self._lose("renew deadline passed without a successful renewal")
                return
            observed = self._observed
            assert observed is not None
            sent = self._clock.monotonic()
            record = replace(
                observed.record,
                renew_time=_after(observed.record.renew_time, self._clock.now()),
                lease_duration_seconds=round(self.timings.lease_duration),
            )
            try:
                result = await _within(self._lock.update(record, observed.version), remaining)
            except LockConflict as exc:
                self._observer.renew_failed(exc)
                if await self._refresh() and self._holder() == self.identity:
                    continue  # our own earlier write landed; renew on the new version
                self._lose("another writer changed the Lease")
                return
            except TimeoutError as exc:
                self._observer.renew_failed(exc)
                self._lose("renew deadline passed without a successful renewal")
                return
            except LockError as exc:
                self._observer.renew_failed(exc)
                self._set_error(str(exc))
                self._publish()
                pause = min(
                    self._jittered(self.timings.retry_period / 4),
                    self._valid_until - self._clock.monotonic(),
                )
                if pause > 0:
                    await asyncio.sleep(pause)
                continue
            if sent - self._last_renew > self.timings.retry_period * 1.5:
                self._log.warning(
                    "renewed late", since_last_renew=round(sent - self._last_renew, 3)
                )
            self._observer.renewed(self._clock.monotonic() - sent)
            self._observe(result)
            self._last_renew = sent
            self._valid_until = sent + self.timings.renew_deadline
            self._publish()
            return

    def _lose(self, reason: str) -> None:
        if not self._leading:
            return
        self._leading = False
        record = self._record()
        self._log.warning(
            "lost", reason=reason, transitions=record.lease_transitions if record else None
        )
        self._publish()
        self._observer.lost(reason)
        if self._hooks is not None:
            deadline = self._clock.monotonic() + self._request_timeout()
            task = asyncio.create_task(self._run_hook(self._hooks.stepping_down(), deadline))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _step_down_and_release(self, reason: str, timeout: float | None = None) -> str | None:
        """Tell the app, then release; None once released, else why it was not."""
        self._leading = False
        self._publish()
        self._observer.lost(reason)
        # Let subscribers hear "not leader" before anyone else can win.
        await self._broadcaster.delivered(timeout=0.25)
        if self._hooks is not None:
            deadline = self._clock.monotonic() + (timeout or self._request_timeout()) / 2
            await self._run_hook(self._hooks.stepping_down(), deadline)
        try:
            async with asyncio.timeout(timeout or self._request_timeout()), self._writing:
                for _ in range(2):
                    observed = self._observed
                    if observed is None or observed.record.holder_identity != self.identity:
                        return "the Lease is no longer held by this replica"
                    released = observed.record.released(self._clock.now())
                    try:
                        result = await self._lock.update(released, observed.version)
                    except LockConflict:
                        # A renewal cancelled in flight may have landed: re-read and retry.
                        current = await self._lock.get()
                        self._observe(current)
                        continue
                    self._observe(result)
                    self._publish()
                    self._log.info(
                        "released", reason=reason, transitions=result.record.lease_transitions
                    )
                    return None
        except (LockError, TimeoutError) as exc:
            self._log.warning("release failed", reason=reason, error=_describe(exc))
            return f"release failed: {_describe(exc)}"
        return "release failed: the Lease kept changing"

    # ---------------------------------------------------------------- helpers

    async def _run_hook(self, hook: Coroutine[Any, Any, None], deadline: float) -> None:
        """Run a hook until `deadline` (monotonic); its failure is logged, never fatal."""
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock.monotonic())):
                await hook
        except TimeoutError:
            self._log.warning("hook timed out", hook=getattr(hook, "__qualname__", "?"))
        except Exception as exc:
            self._log.warning(
                "hook failed", hook=getattr(hook, "__qualname__", "?"), error=str(exc)
            )

    async def _wait_for_change(self, timeout: float) -> None:
        self._changed.clear()
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await _within(self._changed.wait(), timeout)

    def _request_timeout(self) -> float:
        return max(self.timings.renew_deadline, 1.0)

    def _jittered(self, seconds: float) -> float:
        return seconds * (1.0 + 0.2 * random.random())

    def _set_watch_error(self, error: str | None) -> None:
        """Watch failures are kept apart: reads that still work must not hide them."""
        if error != self._watch_error and error:
            self._log.warning("watch error", error=error)
        self._watch_error = error

    def _set_error(self, error: str | None) -> None:
        if error != self._error:
            if error:
                self._log.warning("backend error", error=error)
            elif self._error:
                self._log.info("backend recovered")
        self._error = error

    def _publish(self) -> None:
        mono = self._clock.monotonic()
        wall = self._clock.now()
        leading = self._leading and mono < self._valid_until
        record = self._observed.record if self._observed else None
        governing = self._record()
        if leading:
            role, leader = Role.LEADER, self.identity
        elif self._error is not None or not self._have_observation:
            role, leader = Role.UNKNOWN, ""
        else:
            role, leader = Role.FOLLOWER, self._holder() if self._held_by_other() else ""
        self._broadcaster.publish(
            Leadership(
                identity=self.identity,
                role=role,
                leader=leader,
                lease=LeaseInfo(
                    name=self._lease_name,
                    namespace=self._namespace,
                    transitions=record.lease_transitions if record else None,
                    acquire_time=record.acquire_time if record else None,
                    renew_time=record.renew_time if record else None,
                    duration_seconds=record.lease_duration_seconds if record else None,
                ),
                observed_at=wall,
                valid_until=wall + timedelta(seconds=self._valid_until - mono) if leading else None,
                valid_until_monotonic=self._valid_until if leading else None,
                fencing_token=governing.lease_transitions if governing and leader else None,
                error=self._error or self._watch_error,
                ready=self._have_observation,
                app_health=self._app_health,
            )
        )


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    """`asyncio.wait_for` without its Python 3.11 flaw: a cancellation arriving just as the
    awaited call finishes is lost there, and a SIGTERM must never be lost."""
    async with asyncio.timeout(seconds):
        return await awaitable


def _after(previous: datetime | None, now: datetime) -> datetime:
    """A renewTime later than the last one, even if our wall clock stands still or went back.

    An update that changes nothing is a no-op on the API server: no new resourceVersion, no
    watch event, so followers would see no renewal and take over from a leader that thinks
    it renewed.
    """
    if previous is not None and now <= previous:
        return previous + timedelta(microseconds=1)
    return now


def _older(version: str, than: str) -> bool:
    """Compare backend versions when both are numbers (etcd revisions, local counters)."""
    if version.isdigit() and than.isdigit():
        return int(version) < int(than)
    return False


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the backend did not answer in time"
    if isinstance(exc, LockForbidden):
        return str(exc)
    return str(exc) or type(exc).__name__


class _Backoff:
    def __init__(self, first: float, cap: float) -> None:
        self._first, self._cap, self._next = first, cap, first

    def reset(self) -> None:
        self._next = self._first

    def next(self) -> float:
        delay = self._next * (1.0 + random.random() * 0.5)
        self._next = min(self._next * 2, self._cap)
        return min(delay, self._cap)
