"""The election record in a file, for replicas on one machine (no cluster needed).

Writes are compare-and-swap under `flock` and land by atomic rename, so readers never see half a
record. The file holds the same spec a Lease would, plus an opaque version standing in for the
resourceVersion.

- The flock is taken without blocking, retried with awaited sleeps and given up after
  `lock_timeout` (LockUnavailable): a peer stopped (SIGSTOP) while holding it never freezes
  this process's event loop, so its APIs keep answering.
- A write goes to a fresh temp file (`mkstemp`, unpredictable name) that is fsynced, renamed
  over the record, and the directory fsynced: after a crash the record is the old or the new
  one, never empty.
- The directory is private (0700, ours): anyone who can write into it can forge or block the
  election, so an existing one open to others or owned by another user is refused at start.
- Versions are random, so they never repeat for this file, even across deletion and clock
  steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from sidecar.config import ConfigError
from sidecar.election.lock import LockConflict, LockNotFound, LockUnavailable
from sidecar.election.record import LeaderRecord, VersionedRecord

POLL_SECONDS = 0.05  # a handover takes ~50 ms; reading the file 20 times a second: ~0.02 % CPU
LOCK_TIMEOUT = 1.0  # a healthy peer holds the flock for well under a millisecond
RECORD_FIELDS = (
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
)


class LocalLeaseLock:
    def __init__(self, directory: Path, name: str, lock_timeout: float = LOCK_TIMEOUT) -> None:
        """ConfigError (exit 2) when the directory cannot be made or is not private."""
        self._dir = directory
        self._path = directory / f"{name}.json"
        self._lock_path = directory / f"{name}.lock"
        self._lock_timeout = lock_timeout
        private_directory(directory)

    @property
    def description(self) -> str:
        return str(self._path)

    async def get(self) -> VersionedRecord | None:
        found = self._read()
        return None if found is None else found[1]

    async def create(self, record: LeaderRecord) -> VersionedRecord:
        async with self._locked():
            if self._read() is not None:
                raise LockConflict("the lease file already exists")
            return self._write({"spec": record.to_spec()}, record)

    async def update(self, record: LeaderRecord, version: str) -> VersionedRecord:
        async with self._locked():
            found = self._read()
            if found is None:
                raise LockNotFound("the lease file was deleted")
            data, current = found
            if current.version != version:
                raise LockConflict(f"version {current.version} is not {version}")
            # Keep whatever else the file holds, as an update of a Lease keeps its metadata.
            spec = {k: v for k, v in data["spec"].items() if k not in RECORD_FIELDS}
            return self._write({**data, "spec": {**spec, **record.to_spec()}}, record)

    async def watch(self) -> AsyncGenerator[VersionedRecord | None, None]:
        """Poll the file. Its bytes are compared, not its stat: a rename may reuse the inode
        number with the same size within one coarse mtime tick, and every write's random
        version makes the bytes differ."""
        raw = self._raw()
        current = None if raw is None else self._parse(raw)[1]
        yield current
        while True:
            await asyncio.sleep(POLL_SECONDS)
            latest = self._raw()
            if latest == raw:
                continue
            raw = latest
            record = None if raw is None else self._parse(raw)[1]
            if record != current:
                current = record
                yield current

    async def close(self) -> None:
        return None

    def _read(self) -> tuple[dict[str, Any], VersionedRecord] | None:
        """The file's JSON object and the record in it, or None if there is no file."""
        raw = self._raw()
        return None if raw is None else self._parse(raw)

    def _raw(self) -> bytes | None:
        try:
            return self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LockUnavailable(f"cannot read the lease file {self._path}: {exc}") from exc

    def _parse(self, raw: bytes) -> tuple[dict[str, Any], VersionedRecord]:
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise LockUnavailable(f"cannot read the lease file {self._path}: {exc}") from exc
        return data, _versioned(data, self._path)

    def _write(self, data: dict[str, Any], record: LeaderRecord) -> VersionedRecord:
        version = secrets.token_hex(8)
        text = json.dumps({**data, "version": version}, indent=2) + "\n"
        try:
            fd, temp = tempfile.mkstemp(prefix=f".{self._path.name}.", dir=self._dir)
        except OSError as exc:
            raise LockUnavailable(f"cannot write in {self._dir}: {exc}") from exc
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self._path)
            _fsync_directory(self._dir)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise LockUnavailable(f"cannot write the lease file {self._path}: {exc}") from exc
        return VersionedRecord(record, version)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold the flock; never blocks the event loop while another process holds it."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise LockUnavailable(f"cannot open {self._lock_path}: {exc}") from exc
        try:
            deadline = time.monotonic() + self._lock_timeout
            delay = 0.001
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                        raise LockUnavailable(f"cannot lock {self._lock_path}: {exc}") from exc
                if time.monotonic() >= deadline:
                    raise LockUnavailable(
                        f"another process has held {self._lock_path} for more than "
                        f"{self._lock_timeout:g}s (stopped or stuck?)"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.02)
            yield
        finally:
            os.close(fd)  # closing drops the flock


def private_directory(directory: Path) -> None:
    """Create `directory` (0700) or check that the existing one is ours and closed to others."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise ConfigError(f"--local-dir: cannot create the lease directory: {exc}") from None
    why = "anyone who can write there can forge or block the election"
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"--local-dir: {directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"--local-dir: {directory} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}); {why}: use a directory of your own"
        )
    if info.st_mode & 0o077:
        raise ConfigError(
            f"--local-dir: {directory} is open to group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}); {why}: chmod 700 it or use another directory"
        )


def _versioned(data: Any, path: Path) -> VersionedRecord:
    try:
        if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
            raise ValueError("not an object with a spec object")
        version = data.get("version")
        if not isinstance(version, str | int) or isinstance(version, bool) or version == "":
            raise ValueError("no version")
        return VersionedRecord(LeaderRecord.from_spec(data["spec"]), str(version))
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise LockUnavailable(f"the lease file {path} holds no record we can read: {exc}") from exc


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
