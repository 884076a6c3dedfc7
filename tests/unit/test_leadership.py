"""The fan-out: who is woken for what, the coalesced fresh valid_until, the expiry timer."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role

PERIOD = 0.1


def snapshot(role: Role, valid_for: float | None = None, **extra: object) -> Leadership:
    now = time.monotonic()
    fields: dict[str, object] = {
        "identity": "me",
        "role": role,
        "leader": "me" if role is Role.LEADER else "other",
        "lease": LeaseInfo("l", "ns", 1, None, None, 15),
        "observed_at": datetime.now(UTC),
        "ready": True,
    }
    if valid_for is not None:
        fields["valid_until"] = datetime.now(UTC) + timedelta(seconds=valid_for)
        fields["valid_until_monotonic"] = now + valid_for
        fields["fencing_token"] = 1
    fields.update(extra)
    return Leadership(**fields)  # type: ignore[arg-type]


async def collect(broadcaster: Broadcaster, into: list[tuple[float, Leadership]]) -> None:
    async for item in broadcaster.subscribe():
        into.append((time.monotonic(), item))


async def test_renewals_wake_leader_streams_at_most_once_per_retry_period() -> None:
    broadcaster = Broadcaster(snapshot(Role.LEADER, valid_for=1.0), retry_period=PERIOD)
    got: list[tuple[float, Leadership]] = []
    task = asyncio.create_task(collect(broadcaster, got))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    while time.monotonic() - started < 0.5:  # a renewal every 10 ms
        broadcaster.publish(snapshot(Role.LEADER, valid_for=1.0))
        await asyncio.sleep(0.01)
    task.cancel()
    times = [t for t, _ in got[1:]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 3 <= len(times) <= 6
    assert min(gaps) >= PERIOD * 0.9 and max(gaps) <= PERIOD * 1.5
    assert {s.revision for _, s in got} == {0}  # no change of facts
    # The last message is never more than one period behind the newest renewal.
    newest = broadcaster.current.valid_until_monotonic
    assert newest is not None and got[-1][1].valid_until_monotonic is not None
    assert newest - got[-1][1].valid_until_monotonic <= PERIOD * 1.5


async def test_follower_renewals_wake_nobody() -> None:
    broadcaster = Broadcaster(snapshot(Role.FOLLOWER), retry_period=PERIOD)
    got: list[tuple[float, Leadership]] = []
    task = asyncio.create_task(collect(broadcaster, got))
    await asyncio.sleep(0.01)
    for _ in range(5):
        follower = snapshot(Role.FOLLOWER)
        broadcaster.publish(replace(follower, lease=replace(follower.lease, transitions=1)))
        await asyncio.sleep(PERIOD)
    task.cancel()
    assert len(got) == 1


async def test_not_leader_is_pushed_at_valid_until_without_the_elector() -> None:
    broadcaster = Broadcaster(snapshot(Role.FOLLOWER), retry_period=PERIOD)
    got: list[tuple[float, Leadership]] = []
    task = asyncio.create_task(collect(broadcaster, got))
    await asyncio.sleep(0.01)
    leading = broadcaster.publish(snapshot(Role.LEADER, valid_for=0.2))
    await asyncio.sleep(0.4)
    task.cancel()
    assert [s.role for _, s in got] == [Role.FOLLOWER, Role.LEADER, Role.UNKNOWN]
    deadline = leading.valid_until_monotonic
    assert deadline is not None
    arrived, expired = got[-1]
    assert 0 <= arrived - deadline < 0.01
    assert expired.fencing_token is None and expired.revision == leading.revision + 1


async def test_a_late_publisher_never_revives_an_expired_leader() -> None:
    broadcaster = Broadcaster(snapshot(Role.FOLLOWER), retry_period=PERIOD)
    published = broadcaster.publish(snapshot(Role.LEADER, valid_for=-0.001))
    assert published.role is Role.UNKNOWN


def test_valid_for_ms_is_spliced_into_the_json_per_answer() -> None:
    leader = snapshot(Role.LEADER, valid_for=2.0)
    deadline = leader.valid_until_monotonic
    assert deadline is not None
    early = json.loads(leader.to_json(deadline - 1.5))
    late = json.loads(leader.to_json(deadline - 0.25))
    assert (early["valid_for_ms"], late["valid_for_ms"]) == (1500, 250)
    assert json.loads(leader.to_json(deadline + 1))["valid_for_ms"] == 0
    assert json.loads(snapshot(Role.FOLLOWER).to_json())["valid_for_ms"] is None
    assert early == {**leader.to_dict(deadline - 1.5)}
