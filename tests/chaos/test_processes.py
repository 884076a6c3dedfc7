"""Process faults, repeated: the leader SIGKILLed or SIGTERMed, the whole fleet restarted at once,
and a fleet that mixes leader-sidecar with client-go electors on one Lease (DESIGN §2)."""

from __future__ import annotations

import signal
import time

from tests.chaos.fleet import LEASE, RENEW, RETRY, Fleet, wait_until
from tests.chaos.gobuild import build
from tests.chaos.recorder import assert_safe


def test_the_leader_is_killed_again_and_again(fleet: Fleet) -> None:
    fleet.start(4)
    for _ in range(3):
        leader = fleet.wait_leader()
        killed = time.monotonic()
        leader.kill()
        leader.wait_exit()
        new = fleet.wait_leader(timeout=LEASE + 10)
        took = new.intervals()[-1].start - killed
        # It saw the last renewal at most a retry period before the kill, and waits the lease.
        assert LEASE - RETRY - 0.1 <= took <= LEASE + 1.5, f"failover took {took:.3f} s"
        fleet.replace(leader)
    report = assert_safe(fleet.members)
    assert report.handovers >= 3, report.summary()


def test_the_leader_is_stopped_again_and_again(fleet: Fleet) -> None:
    fleet.start(4)
    handovers = []
    for _ in range(6):
        leader = fleet.wait_leader()
        stopped = time.monotonic()
        leader.terminate()
        new = fleet.wait_leader(timeout=5, among=[r for r in fleet.live() if r is not leader])
        handovers.append(new.intervals()[-1].start - stopped)
        assert leader.wait_exit() == 0
        # It told its app before anyone else led (the checker also covers this).
        assert leader.intervals()[-1].end <= new.intervals()[-1].start
        fleet.replace(leader)
    # Release, a watch event and one update: far below the lease duration every time.
    assert max(handovers) < 1.0, [round(h, 3) for h in handovers]
    assert_safe(fleet.members)


def test_the_whole_fleet_restarts_at_once_many_times(fleet: Fleet) -> None:
    names = [f"web-{i}" for i in range(5)]  # a StatefulSet: the same identities come back
    group = fleet.start(names=names, count=len(names))
    for round_ in range(3):
        fleet.wait_leader()
        sig = signal.SIGKILL if round_ % 2 else signal.SIGTERM
        for replica in group:
            replica.proc.send_signal(sig)
        for replica in group:
            replica.wait_exit()
        group = fleet.start(names=names, count=len(names), args=fleet.args())
    fleet.wait_leader(timeout=LEASE + 10)
    assert_safe(fleet.members)


def test_a_fleet_mixed_with_client_go_electors_stays_safe(fleet: Fleet) -> None:
    binary = build("clientgo")
    sidecars = fleet.start(2)
    electors = fleet.start_clientgo(binary, ["go-0", "go-1"])
    for elector in electors:
        elector.wait_event("ready")

    def one_leader() -> bool:
        return len(fleet.leaders()) == 1

    for round_ in range(4):
        wait_until(one_leader, LEASE + 2 * RENEW + 10, "one leader in the mixed fleet")
        [leader] = fleet.leaders()
        if round_ % 2:
            leader.terminate()
        else:
            leader.kill()  # type: ignore[attr-defined]
        leader.stop()
        if leader in electors:
            index = electors.index(leader)
            electors[index] = fleet.start_clientgo(binary, [f"go-{2 + round_}"])[0]
            electors[index].wait_event("ready")
        else:
            sidecars[sidecars.index(leader)] = fleet.replace(leader)  # type: ignore[arg-type]
    wait_until(one_leader, LEASE + 2 * RENEW + 10, "one leader in the mixed fleet")
    report = assert_safe(fleet.members)
    assert report.handovers >= 4, report.summary()
