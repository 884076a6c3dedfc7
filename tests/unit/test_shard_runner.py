"""The shard runner (sidecar/shards/runner.py) with the local backend, in-process: it owns
shards, and on shutdown releases them all and withdraws its member record before it returns,
even when the withdrawal is slower than the releases."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

from sidecar.backends.local import LocalLeaseLock
from sidecar.election.core import Timings
from sidecar.election.record import LeaderRecord
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role
from sidecar.shards.members import LocalMembers, member_name
from sidecar.shards.runner import ShardRunner, initial_snapshot
from sidecar.shards.snapshot import ShardsBroadcaster

TIMINGS = Timings(lease_duration=1.0, renew_deadline=0.6, retry_period=0.2)


class SlowToWithdraw(LocalMembers):
    async def withdraw(self) -> None:
        await asyncio.sleep(0.5)
        await super().withdraw()


def _private(directory: Path) -> Path:
    directory.chmod(0o700)
    return directory


def _after_shutdown(directory: Path, names: list[str]) -> None:
    assert not (directory / f"{member_name('lease', 'me')}.member.json").exists()
    for name in names:
        spec = json.loads((directory / f"{name}.json").read_text())["spec"]
        assert spec["holderIdentity"] == ""  # released, as client-go does


async def test_shutdown_releases_every_shard_and_waits_for_the_withdrawal(tmp_path: Path) -> None:
    tmp_path = _private(tmp_path)
    names = [f"lease-{i}" for i in range(3)]
    leader = Broadcaster(
        Leadership(
            identity="me",
            role=Role.UNKNOWN,
            leader="",
            lease=LeaseInfo("lease-0", "local"),
            observed_at=datetime.now(UTC),
        )
    )
    shards = ShardsBroadcaster(initial_snapshot("me", 3))
    runner = ShardRunner(
        [LocalLeaseLock(tmp_path, name) for name in names],
        SlowToWithdraw(tmp_path, "lease", "me"),
        "me",
        TIMINGS,
        leader,
        shards,
        names,
        "local",
    )
    task = asyncio.create_task(runner.run())
    async with asyncio.timeout(10):
        async for snapshot in shards.subscribe():  # alone: all three, after the creation wait
            if len(snapshot.owned) == 3:
                break
    assert shards.current.members == ("me",)
    assert leader.current.is_leader  # shard 0 doubles as "the leader"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await runner.shutdown(timeout=5)
    _after_shutdown(tmp_path, names)


async def test_a_replica_whose_app_is_not_healthy_yet_never_announces_itself(
    tmp_path: Path,
) -> None:
    tmp_path = _private(tmp_path)
    announced: list[object] = []

    class Recording(LocalMembers):
        async def announce(self, record: LeaderRecord) -> None:
            announced.append(record)

    leader = Broadcaster(
        Leadership(
            identity="me",
            role=Role.UNKNOWN,
            leader="",
            lease=LeaseInfo("lease-0", "local"),
            observed_at=datetime.now(UTC),
        )
    )
    runner = ShardRunner(
        [LocalLeaseLock(tmp_path, "lease-0")],
        Recording(tmp_path, "lease", "me"),
        "me",
        TIMINGS,
        leader,
        ShardsBroadcaster(initial_snapshot("me", 1)),
        ["lease-0"],
        "local",
    )
    runner.set_eligible(False, "unknown")  # as app.py does with --app-health-url
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.3)
    assert announced == []
    runner.set_eligible(True, "healthy")
    await asyncio.sleep(0.3)
    assert len(announced) == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await runner.shutdown(timeout=2)
