"""An in-memory LeaseLock shared by several electors, with switches for faults (unit tests only)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from sidecar.election.lock import LockConflict, LockUnavailable
from sidecar.election.record import LeaderRecord, VersionedRecord


class Store:
    """One record with a version counter: the 'API server' of the unit tests."""

    def __init__(self) -> None:
        self.current: VersionedRecord | None = None
        self.version = 0
        self.down = False  # every call fails as if the backend were unreachable
        self.writes: list[LeaderRecord] = []
        self.changed = asyncio.Condition()

    async def put(self, record: LeaderRecord | None) -> VersionedRecord | None:
        self.version += 1
        self.current = None if record is None else VersionedRecord(record, str(self.version))
        if record is not None:
            self.writes.append(record)
        async with self.changed:
            self.changed.notify_all()
        return self.current


class MemoryLock:
    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def description(self) -> str:
        return "memory"

    def _check(self) -> None:
        if self.store.down:
            raise LockUnavailable("backend down")

    async def get(self) -> VersionedRecord | None:
        self._check()
        return self.store.current

    async def create(self, record: LeaderRecord) -> VersionedRecord:
        self._check()
        if self.store.current is not None:
            raise LockConflict("exists")
        result = await self.store.put(record)
        assert result is not None
        return result

    async def update(self, record: LeaderRecord, version: str) -> VersionedRecord:
        self._check()
        current = self.store.current
        if current is None or current.version != version:
            raise LockConflict("stale version")
        result = await self.store.put(record)
        assert result is not None
        return result

    async def watch(self) -> AsyncIterator[VersionedRecord | None]:
        self._check()
        seen = self.store.version
        yield self.store.current
        while True:
            async with self.store.changed:
                await self.store.changed.wait_for(self._moved_from(seen))
            self._check()
            seen = self.store.version
            yield self.store.current

    def _moved_from(self, version: int) -> Callable[[], bool]:
        return lambda: self.store.version != version or self.store.down

    async def close(self) -> None:
        return None
