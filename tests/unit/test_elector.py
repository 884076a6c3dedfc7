"""The elector's rules against an in-memory lock. The real API server is in tests/e2e."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest

from sidecar.election.elector import Elector, Timings
from sidecar.election.record import LeaderRecord
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role
from tests.unit.memory_lock import MemoryLock, Store

MakeReplica = Callable[..., "Replica"]
FAST = Timings(lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)


class Replica:
    def __init__(self, store: Store, name: str, timings: Timings = FAST) -> None:
        self.broadcaster = Broadcaster(
            Leadership(name, Role.UNKNOWN, "", LeaseInfo("l", "ns"), datetime.now(UTC))
        )
        self.elector = Elector(MemoryLock(store), name, timings, self.broadcaster, "l", "ns")
        self.task = asyncio.create_task(self.elector.run())

    @property
    def now(self) -> Leadership:
        return self.broadcaster.current.as_of(time.monotonic())

    async def until(self, predicate: Callable[[Leadership], bool], timeout: float = 5) -> float:
        """Wait for a snapshot matching `predicate`; return the monotonic time it was seen."""
        async with asyncio.timeout(timeout):
            async for snapshot in self.broadcaster.subscribe():
                if predicate(snapshot):
                    return time.monotonic()
        raise AssertionError("stream ended")

    async def crash(self) -> None:
        """Stop without releasing, like a SIGKILL."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def stop(self) -> None:
        await self.crash()
        await self.elector.shutdown(timeout=2)


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    yield Store()


@pytest.fixture
async def replicas(store: Store) -> AsyncIterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(name: str, timings: Timings = FAST) -> Replica:
        replica = Replica(store, name, timings)
        made.append(replica)
        return replica

    yield make
    for replica in made:
        await replica.crash()


def leading(s: Leadership) -> bool:
    return s.is_leader


async def settled(group: list[Replica]) -> Replica:
    """Wait until one replica leads and all others follow it; return the leader."""
    streams = [r.broadcaster.subscribe() for r in group]
    pending = {asyncio.ensure_future(anext(stream)): stream for stream in streams}
    try:
        async with asyncio.timeout(5):
            while True:
                leaders = [r for r in group if r.now.is_leader]
                if len(leaders) == 1 and all(
                    r.now.role is Role.FOLLOWER and r.now.leader == leaders[0].elector.identity
                    for r in group
                    if r is not leaders[0]
                ):
                    return leaders[0]
                # Wake on any replica's change (and now and then, as leadership also lapses).
                done, _ = await asyncio.wait(
                    pending, timeout=0.05, return_when=asyncio.FIRST_COMPLETED
                )
                for future in done:
                    stream = pending.pop(future)
                    pending[asyncio.ensure_future(anext(stream))] = stream
    finally:
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def test_a_lone_candidate_creates_the_lease_and_leads(
    store: Store, replicas: MakeReplica
) -> None:
    started = time.monotonic()
    a = replicas("a")
    await a.until(leading)
    # Absent may mean "deleted a moment ago while its holder still acts": wait it out once.
    assert time.monotonic() - started >= FAST.lease_duration
    assert store.current is not None
    record = store.current.record
    assert (record.holder_identity, record.lease_transitions, record.lease_duration_seconds) == (
        "a",
        0,
        1,
    )
    assert a.now.fencing_token == 0
    assert a.now.valid_until is not None


async def test_three_candidates_elect_exactly_one(replicas: MakeReplica) -> None:
    group = [replicas(n) for n in ("a", "b", "c")]
    leader = await settled(group)
    assert sum(r.now.is_leader for r in group) == 1
    assert {r.now.leader for r in group} == {leader.elector.identity}


async def test_the_leader_renews(store: Store, replicas: MakeReplica) -> None:
    a = replicas("a")
    await a.until(leading)
    first = len(store.writes)
    async with asyncio.timeout(2):
        while len(store.writes) < first + 3:
            async with store.changed:
                await store.changed.wait()
    assert all(w.holder_identity == "a" and w.lease_transitions == 0 for w in store.writes)
    assert a.now.is_leader


async def test_resign_hands_over_at_once_and_the_token_grows(
    store: Store, replicas: MakeReplica
) -> None:
    group = [replicas(n) for n in ("a", "b", "c")]
    leader = await settled(group)
    token = leader.now.fencing_token
    assert token is not None
    started = time.monotonic()
    assert (await leader.elector.resign()).released
    assert not leader.now.is_leader
    others = [r for r in group if r is not leader]
    waiters = [asyncio.ensure_future(r.until(leading)) for r in others]
    _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in pending:
        waiter.cancel()
    assert time.monotonic() - started < FAST.lease_duration  # no waiting for expiry
    new = await settled(group)
    assert new is not leader
    assert new.now.fencing_token == token + 1
    assert not (await leader.elector.resign()).led  # it no longer leads: 409 in the API


async def test_a_crashed_leader_is_replaced_only_after_the_lease_duration(
    store: Store,
    replicas: MakeReplica,
) -> None:
    a = replicas("a")
    await a.until(leading)
    b = replicas("b")
    await b.until(lambda s: s.leader == "a")
    await a.crash()
    last_write = time.monotonic()  # a's last renewal happened before this
    took_over = await b.until(leading)
    assert store.current is not None
    assert store.current.record.holder_identity == "b"
    # b saw a's last renewal no earlier than it was written, so it waited a full lease.
    assert took_over - last_write >= FAST.lease_duration - FAST.retry_period
    assert took_over - last_write < FAST.lease_duration + 0.5


async def test_the_leader_stops_leading_before_the_renew_deadline_when_the_backend_is_gone(
    store: Store,
    replicas: MakeReplica,
) -> None:
    a = replicas("a")
    await a.until(leading)
    # Take the backend down right after a successful renewal.
    async with store.changed:
        await store.changed.wait()
    renewed = time.monotonic()
    store.down = True
    lost = await a.until(lambda s: not s.is_leader)
    assert lost - renewed <= FAST.renew_deadline + 0.05
    assert a.now.role is Role.UNKNOWN
    assert a.now.error
    store.down = False
    await a.until(leading)  # and it comes back once the backend does


async def test_a_foreign_write_makes_the_leader_step_down_at_once(
    store: Store,
    replicas: MakeReplica,
) -> None:
    a = replicas("a")
    await a.until(leading)
    assert store.current is not None
    intruder = LeaderRecord("intruder", 30, datetime.now(UTC), datetime.now(UTC), 5)
    written = time.monotonic()
    await store.put(intruder)
    stepped_down = await a.until(lambda s: not s.is_leader)
    assert stepped_down - written < FAST.retry_period
    assert a.now.leader == "intruder"


async def test_a_deleted_lease_is_recreated(store: Store, replicas: MakeReplica) -> None:
    group = [replicas(n) for n in ("a", "b")]
    await settled(group)
    await store.put(None)
    async with store.changed:
        await asyncio.wait_for(store.changed.wait_for(lambda: store.current is not None), 5)
    leader = await settled(group)
    assert store.current is not None
    assert store.current.record.holder_identity == leader.elector.identity


async def test_shutdown_tells_the_app_first_then_releases_like_client_go(
    store: Store,
    replicas: MakeReplica,
) -> None:
    a = replicas("a")
    await a.until(leading)
    seen: list[bool] = []

    async def app() -> None:
        async for snapshot in a.broadcaster.subscribe():
            seen.append(snapshot.is_leader)
            # When the app hears "not leader", the Lease must still be ours.
            if not snapshot.is_leader and seen[:-1] and seen[-2]:
                assert store.current is not None
                assert store.current.record.holder_identity == "a"
                return

    listener = asyncio.create_task(app())
    await a.until(leading)
    await a.stop()
    await asyncio.wait_for(listener, 2)
    assert store.current is not None
    record = store.current.record
    assert (record.holder_identity, record.lease_duration_seconds) == ("", 1)
    assert record.lease_transitions == 0


async def test_a_released_lease_is_taken_without_waiting(
    store: Store, replicas: MakeReplica
) -> None:
    slow = Timings(lease_duration=30, renew_deadline=20, retry_period=2)
    # A released record from an earlier leader: an absent one would be waited out first.
    await store.put(LeaderRecord("", 1, lease_transitions=3).released(datetime.now(UTC)))
    a = replicas("a", slow)
    await a.until(leading)
    b = replicas("b", slow)
    await b.until(lambda s: s.leader == "a")
    released = time.monotonic()
    await a.stop()
    took_over = await b.until(leading)
    assert took_over - released < 1.0
    assert b.now.fencing_token == 5


async def test_an_empty_backend_is_unknown_not_follower(
    store: Store, replicas: MakeReplica
) -> None:
    store.down = True
    a = replicas("a")
    await a.until(lambda s: s.error is not None)
    assert a.now.role is Role.UNKNOWN
    assert not a.now.ready
