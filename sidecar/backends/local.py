"""The election record in a file, for replicas on one machine (no cluster needed).

Writes are compare-and-swap under `flock` and land by atomic rename, so readers never see half a
record. The file holds the same spec a Lease would, plus a version counter standing in for the
resourceVersion.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from sidecar.election.lock import LockConflict, LockUnavailable
from sidecar.election.record import LeaderRecord, VersionedRecord

POLL_SECONDS = 0.05  # a stat() this often costs nothing and makes a handover take ~50 ms


class LocalLeaseLock:
    def __init__(self, directory: Path, name: str) -> None:
        self._dir = directory
        self._path = directory / f"{name}.json"
        self._lock_path = directory / f"{name}.lock"
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LockUnavailable(f"cannot create the lease directory {directory}: {exc}") from exc

    @property
    def description(self) -> str:
        return str(self._path)

    async def get(self) -> VersionedRecord | None:
        return self._read()

    async def create(self, record: LeaderRecord) -> VersionedRecord:
        with self._locked():
            if self._read() is not None:
                raise LockConflict("the lease file already exists")
            # Versions only grow, even across a deletion: start from the clock.
            return self._write(record, time.time_ns() // 1000)

    async def update(self, record: LeaderRecord, version: str) -> VersionedRecord:
        with self._locked():
            current = self._read()
            if current is None:
                raise LockConflict("the lease file was deleted")
            if current.version != version:
                raise LockConflict(f"version {current.version} is not {version}")
            return self._write(record, int(version) + 1)

    async def watch(self) -> AsyncIterator[VersionedRecord | None]:
        current = self._read()
        yield current
        stamp = self._stamp()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            new_stamp = self._stamp()
            if new_stamp == stamp:
                continue
            stamp = new_stamp
            latest = self._read()
            if latest != current:
                current = latest
                yield current

    async def close(self) -> None:
        return None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LockUnavailable(f"cannot read {self._path}: {exc}") from exc
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _read(self) -> VersionedRecord | None:
        try:
            data = json.loads(self._path.read_text())
            return VersionedRecord(LeaderRecord.from_spec(data["spec"]), str(data["version"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LockUnavailable(f"cannot read the lease file {self._path}: {exc}") from exc

    def _write(self, record: LeaderRecord, version: int) -> VersionedRecord:
        data = {"version": version, "spec": record.to_spec()}
        temp = self._path.with_suffix(f".{os.getpid()}.tmp")
        try:
            temp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(temp, self._path)
        except OSError as exc:
            raise LockUnavailable(f"cannot write the lease file {self._path}: {exc}") from exc
        return VersionedRecord(record, str(version))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            handle = open(self._lock_path, "a+")  # noqa: SIM115 -- closed below
        except OSError as exc:
            raise LockUnavailable(f"cannot open {self._lock_path}: {exc}") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            handle.close()  # closing drops the flock
