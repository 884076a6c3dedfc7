"""Wall-clock jumps must not cause a false takeover: expiry is judged on observed monotonic time.

The sidecars run under Debian's libfaketime (LD_PRELOAD): CLOCK_REALTIME follows an offset that
the test rewrites at run time (FAKETIME_TIMESTAMP_FILE, re-read every second), while
CLOCK_MONOTONIC stays real (FAKETIME_DONT_FAKE_MONOTONIC=1). So the real process, with its real
event loop and HTTP client, sees its wall clock jump forward, back, or stop.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest

from tests.chaos.fleet import LEASE, Fleet, RecordedReplica, poll, write_kubeconfig
from tests.chaos.recorder import assert_safe

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

pytestmark = pytest.mark.skipif(
    not LIBFAKETIME.exists(), reason="needs Debian's libfaketime (apt-get install libfaketime)"
)


class FakeClock:
    """One replica's wall clock: an offset from the real one, or frozen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0.0
        self.frozen: float | None = None  # the epoch second it stands still at
        self.set(0)

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_CACHE_DURATION": "1",
        }

    def set(self, offset: float) -> None:
        self.offset, self.frozen = offset, None
        self.path.write_text(f"{offset:+.0f}\n")

    def freeze(self) -> None:
        """Stop the clock at the current real time (libfaketime: an absolute date without @)."""
        now = int(time.time())
        self.offset, self.frozen = 0, float(now)
        self.path.write_text(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + "\n")

    def shows(self, replica: RecordedReplica) -> bool:
        """The replica's last published wall time matches this clock (within 2 s)."""
        observed = datetime.strptime(replica.leader()["observed_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
        seen = observed.replace(tzinfo=UTC).timestamp()
        if self.frozen is not None:
            return seen == self.frozen
        return abs(seen - (time.time() + self.offset)) < 2.0


def _fleet_with_clocks(fleet: Fleet, count: int) -> dict[str, FakeClock]:
    # TLS verification would fail once a clock goes back before the test CA's start of
    # validity (minutes ago): these replicas skip it, as nothing here is about TLS.
    kubeconfig = write_kubeconfig(fleet.cluster, fleet.workdir / "kubeconfig-clock", insecure=True)
    clocks = {}
    for i in range(count):
        name = f"r{i}"
        clocks[name] = FakeClock(fleet.workdir / f"faketime-{name}")
        fleet.start(args=fleet.args(kubeconfig), env=clocks[name].env(), names=[name])
    return clocks


def _hold(fleet: Fleet, leader: RecordedReplica) -> list[dict[str, object]]:
    """Watch the Lease for longer than a lease duration: the leader keeps renewing it."""
    specs = fleet.watch_lease(LEASE + 1)
    assert {s["holderIdentity"] for s in specs} == {leader.name}, specs
    assert len({s["leaseTransitions"] for s in specs}) == 1, specs
    assert leader.leading
    return specs


@pytest.mark.timeout(180)
def test_wall_clock_jumps_cause_no_takeover(fleet: Fleet) -> None:
    clocks = _fleet_with_clocks(fleet, 3)
    leader = fleet.wait_leader()
    followers = [r for r in fleet.live() if r is not leader]
    steps: list[tuple[str, list[RecordedReplica], float]] = [
        ("leader an hour ahead", [leader], 3600),
        ("leader an hour behind", [leader], -3600),
        ("followers a day ahead", followers, 86400),
        ("followers a day behind", followers, -86400),
        ("everyone back to the real time", fleet.live(), 0),
    ]
    for what, who, offset in steps:
        for replica in who:
            clocks[replica.name].set(offset)
        for replica in who:
            clock = clocks[replica.name]
            poll(partial(clock.shows, replica), 10, f"{what}: {replica.name}'s clock")
        specs = _hold(fleet, leader)
        renews = [str(spec["renewTime"]) for spec in specs]
        # renewTime never repeats or goes back (an unchanged record would be a no-op write).
        assert renews == sorted(renews) and len(set(renews)) == len(renews), renews
        if who == [leader] and offset > 0:
            # The record carries the holder's jumped wall clock; nobody judges expiry by it.
            renew = datetime.strptime(renews[-1], "%Y-%m-%dT%H:%M:%S.%fZ")
            assert abs(renew.replace(tzinfo=UTC).timestamp() - time.time() - offset) < 5
    assert len(leader.intervals()) == 1, (leader.events[:6], leader.log_text())
    assert all(not r.intervals() for r in followers)
    assert_safe(fleet.members)


@pytest.mark.timeout(120)
def test_a_frozen_wall_clock_on_the_leader_causes_no_takeover(fleet: Fleet) -> None:
    """A stopped wall clock would make every renewal write the same renewTime, and the API
    server does not store an update that changes nothing (no new resourceVersion, no watch
    event): followers would take over from a leader that thinks it renews. The elector keeps
    renewTime strictly increasing, so the leader keeps its Lease."""
    clocks = _fleet_with_clocks(fleet, 3)
    leader = fleet.wait_leader()
    clocks[leader.name].freeze()
    poll(lambda: clocks[leader.name].shows(leader), 10, "the leader's clock stopped")
    # Without strictly increasing renewals this is a takeover of a live, renewing leader.
    _hold(fleet, leader)
    _hold(fleet, leader)
