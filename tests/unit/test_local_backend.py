"""The local file backend: compare-and-swap semantics, typed errors for garbage files, a flock
that never blocks the event loop, a private directory, and versions that never repeat."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sidecar.backends.local import LocalLeaseLock
from sidecar.config import ConfigError, default_local_dir
from sidecar.election.lock import LockConflict, LockNotFound, LockUnavailable
from sidecar.election.record import LeaderRecord

RECORD = LeaderRecord("me", 15, datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, tzinfo=UTC))


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "leases"


@pytest.fixture
def lock(directory: Path) -> LocalLeaseLock:
    return LocalLeaseLock(directory, "shop")


async def test_create_get_update_compare_and_swap(lock: LocalLeaseLock) -> None:
    assert await lock.get() is None
    created = await lock.create(RECORD)
    assert await lock.get() == created
    with pytest.raises(LockConflict):
        await lock.create(RECORD)
    renewed = await lock.update(RECORD, created.version)
    assert renewed.version != created.version
    with pytest.raises(LockConflict):
        await lock.update(RECORD, created.version)
    assert await lock.get() == renewed


async def test_update_of_a_deleted_file_is_lock_not_found(
    lock: LocalLeaseLock, directory: Path
) -> None:
    created = await lock.create(RECORD)
    (directory / "shop.json").unlink()
    with pytest.raises(LockNotFound):
        await lock.update(RECORD, created.version)


async def test_versions_never_repeat_even_across_deletion(
    lock: LocalLeaseLock, directory: Path
) -> None:
    seen: set[str] = set()
    for _ in range(20):
        current = await lock.create(RECORD)
        for _ in range(5):
            assert current.version not in seen
            seen.add(current.version)
            current = await lock.update(RECORD, current.version)
        (directory / "shop.json").unlink()
    assert len(seen) == 100


async def test_an_update_keeps_what_else_the_file_holds(
    lock: LocalLeaseLock, directory: Path
) -> None:
    created = await lock.create(RECORD)
    path = directory / "shop.json"
    data = json.loads(path.read_text())
    data["annotations"] = {"team": "payments"}
    data["spec"]["preferredHolder"] = "web-2"
    path.write_text(json.dumps(data))
    await lock.update(LeaderRecord("me", 15), created.version)
    data = json.loads(path.read_text())
    assert data["annotations"] == {"team": "payments"}
    assert data["spec"]["preferredHolder"] == "web-2"
    assert "renewTime" not in data["spec"]


async def test_writes_leave_no_temp_files_behind(lock: LocalLeaseLock, directory: Path) -> None:
    current = await lock.create(RECORD)
    for _ in range(5):
        current = await lock.update(RECORD, current.version)
    assert sorted(os.listdir(directory)) == ["shop.json", "shop.lock"]


GARBAGE = {
    "not JSON": b"{not json",
    "binary": b"\xff\xfe\x00",
    "a JSON array": b"[1, 2]",
    "no spec": b'{"version": "1"}',
    "a spec that is a list": b'{"version": "1", "spec": ["x"]}',
    "no version": b'{"spec": {}}',
    "a bad MicroTime": b'{"version": "1", "spec": {"renewTime": "soon"}}',
    "a bad duration": b'{"version": "1", "spec": {"leaseDurationSeconds": [1]}}',
    "an infinite duration": b'{"version": "1", "spec": {"leaseDurationSeconds": 1e999}}',
    "JSON nested too deeply": b"[" * 100_000,
}


@pytest.mark.parametrize("case", list(GARBAGE))
async def test_a_garbage_file_is_lock_unavailable_for_every_call(
    lock: LocalLeaseLock, directory: Path, case: str
) -> None:
    (directory / "shop.json").write_bytes(GARBAGE[case])
    with pytest.raises(LockUnavailable) as caught:
        await lock.get()
    assert "shop.json" in str(caught.value)
    with pytest.raises(LockUnavailable):
        await lock.update(RECORD, "1")
    with pytest.raises(LockUnavailable):
        await lock.create(RECORD)
    watch = lock.watch()
    with pytest.raises(LockUnavailable):
        await anext(watch)


async def test_a_watch_sees_every_write_and_a_garbage_file_ends_it_typed(
    lock: LocalLeaseLock, directory: Path
) -> None:
    watch = lock.watch()
    assert await anext(watch) is None
    created = await lock.create(RECORD)
    assert await asyncio.wait_for(anext(watch), 1) == created
    renewed = await lock.update(RECORD, created.version)  # same size, same second
    assert await asyncio.wait_for(anext(watch), 1) == renewed
    (directory / "shop.json").write_text("<garbage>")
    with pytest.raises(LockUnavailable):
        await asyncio.wait_for(anext(watch), 1)


@pytest.fixture
def flock_held(directory: Path, lock: LocalLeaseLock) -> Iterator[None]:
    """Another open file description holds the flock, as a peer process (stopped) would."""
    fd = os.open(directory / "shop.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
    os.close(fd)


async def test_a_held_flock_never_blocks_the_event_loop(directory: Path, flock_held: None) -> None:
    lock = LocalLeaseLock(directory, "shop", lock_timeout=0.3)
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    with pytest.raises(LockUnavailable) as caught:
        await lock.create(RECORD)
    waited = time.monotonic() - started
    ticking.cancel()
    assert 0.3 <= waited < 0.6
    assert "shop.lock" in str(caught.value) and "0.3s" in str(caught.value)
    assert max(gaps) < 0.05, f"the event loop stalled for {max(gaps) * 1000:.0f} ms"
    assert await lock.get() is None  # reads need no flock


async def test_a_flock_released_in_time_lets_the_write_through(
    directory: Path, lock: LocalLeaseLock
) -> None:
    fd = os.open(directory / "shop.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    asyncio.get_running_loop().call_later(0.1, os.close, fd)
    assert (await lock.create(RECORD)).record == RECORD


def test_the_directory_is_created_private(directory: Path) -> None:
    LocalLeaseLock(directory, "shop")
    assert directory.stat().st_mode & 0o777 == 0o700


def test_a_directory_open_to_others_is_refused(directory: Path) -> None:
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with pytest.raises(ConfigError) as caught:
        LocalLeaseLock(directory, "shop")
    message = str(caught.value)
    assert message.startswith("--local-dir: ") and "open to group or others" in message
    assert "755" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_directory_of_another_user_is_refused(directory: Path) -> None:
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(ConfigError) as caught:
        LocalLeaseLock(directory, "shop")
    assert "belongs to uid 65534" in str(caught.value)


def test_a_file_in_place_of_the_directory_is_refused(directory: Path) -> None:
    directory.write_text("")
    with pytest.raises(ConfigError) as caught:
        LocalLeaseLock(directory, "shop")
    assert str(caught.value).startswith("--local-dir: ")


def test_the_default_directory_does_not_depend_on_tmpdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", "/somewhere/else")
    assert default_local_dir() == Path(f"/tmp/leader-sidecar-{os.geteuid()}")
