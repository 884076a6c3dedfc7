"""The API server, then etcd, stopped and restarted under a running fleet, twice each."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.chaos.fleet import LEASE, RENEW, Fleet, wait_until
from tests.chaos.recorder import assert_safe


def _outage(fleet: Fleet, stop: Callable[[], None], start: Callable[[], None]) -> None:
    leader = fleet.wait_leader()
    stopped = time.monotonic()
    try:
        stop()
        # The leader stops claiming leadership by its renew deadline, from the last renewal
        # it sent before the stop.
        leader.wait_for(lambda s: not s.get("is_leader"), timeout=RENEW + 5)
        lost = leader.intervals()[-1].end
        assert lost - stopped <= RENEW + 0.5, f"still leader {lost - stopped:.3f} s after"
        # Nobody pretends to know who leads while the API cannot be reached.
        wait_until(
            lambda: all(r.latest.get("state") == "unknown" for r in fleet.live()),
            LEASE + 2 * RENEW + 10,
            "every replica reports state unknown",
        )
        assert not fleet.leaders()
    finally:
        start()
    fleet.wait_leader(timeout=60)


@pytest.mark.timeout(240)
def test_the_api_server_stops_and_comes_back(fleet: Fleet) -> None:
    fleet.start(3)
    for _ in range(2):
        _outage(
            fleet,
            lambda: fleet.cluster.stop_apiserver(kill=True),
            fleet.cluster.start_apiserver,
        )
    assert_safe(fleet.members)


@pytest.mark.timeout(240)
def test_etcd_stops_and_comes_back(fleet: Fleet) -> None:
    fleet.start(3)
    for _ in range(2):
        _outage(fleet, lambda: fleet.cluster.stop_etcd(kill=True), fleet.cluster.start_etcd)
    assert_safe(fleet.members)
