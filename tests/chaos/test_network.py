"""Network faults between ONE replica and the API server (toxiproxy): a black hole, then heal;
and latency on every API call, longer than the retry period."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.fleet import (
    LEASE,
    RENEW,
    RETRY,
    Fleet,
    RecordedReplica,
    write_kubeconfig,
)
from tests.chaos.recorder import assert_safe
from tests.chaos.toxiproxy import Proxy, Toxiproxy


@pytest.fixture
def toxiproxy(tmp_path: Path) -> Iterator[Toxiproxy]:
    with Toxiproxy(tmp_path) as server:
        yield server


def _behind(fleet: Fleet, proxy: Proxy, name: str) -> RecordedReplica:
    kubeconfig = write_kubeconfig(
        fleet.cluster, fleet.workdir / f"kubeconfig-{name}", server=proxy.url
    )
    return fleet.start(args=fleet.args(kubeconfig), names=[name])[0]


@pytest.mark.timeout(180)
def test_a_partitioned_replica_never_leads_beside_another(
    fleet: Fleet, toxiproxy: Toxiproxy
) -> None:
    # Every replica has its own link, so any of them can be cut off alone.
    proxies = {f"r{i}": toxiproxy.proxy(f"r{i}", fleet.cluster.port) for i in range(3)}
    replicas = [_behind(fleet, proxy, name) for name, proxy in proxies.items()]
    for round_ in range(3):
        leader = fleet.wait_leader()
        # Rounds 0 and 1 cut off the leader, round 2 a follower.
        victim = leader if round_ < 2 else next(r for r in replicas if r is not leader)
        others = [r for r in replicas if r is not victim]
        cut = time.monotonic()
        proxies[victim.name].black_hole()
        if victim is leader:
            victim.wait_for(lambda s: not s.get("is_leader"), timeout=RENEW + 5)
            lost = victim.intervals()[-1].end
            assert lost - cut <= RENEW + 0.5, f"still leader {lost - cut:.3f} s after the cut"
            new = fleet.wait_leader(timeout=LEASE + 10, among=others)
            assert new.intervals()[-1].start - cut >= LEASE - RETRY - 0.1
        # The cut-off replica finds out that it cannot reach the API server and says so.
        victim.wait_for(lambda s: s.get("state") == "unknown", timeout=LEASE + 2 * RENEW + 5)
        assert not victim.leading
        proxies[victim.name].heal()
        fleet.wait_leader(timeout=30)  # it is back, and names the same leader as the others
    report = assert_safe(fleet.members)
    assert report.handovers >= 2, report.summary()


@pytest.mark.timeout(180)
def test_api_calls_slower_than_the_retry_period(fleet: Fleet, toxiproxy: Toxiproxy) -> None:
    proxy = toxiproxy.proxy("slow", fleet.cluster.port)
    # Every answer (and every TLS flight from the server) arrives this much later.
    latency_ms = int(RETRY * 1000 * 1.75)
    proxy.latency(latency_ms, jitter_ms=100)
    kubeconfig = write_kubeconfig(
        fleet.cluster, fleet.workdir / "kubeconfig-slow", server=proxy.url
    )
    fleet.start(3, args=fleet.args(kubeconfig))
    for _ in range(2):
        leader = fleet.wait_leader(timeout=LEASE + 20)
        # Hold the leadership through several lease durations of slow renewals.
        specs = fleet.watch_lease(2 * LEASE)
        assert len(specs) >= 3, specs  # renewed, again and again
        assert {s["holderIdentity"] for s in specs} == {leader.name}, specs
        assert len({s["leaseTransitions"] for s in specs}) == 1, specs
        assert leader.leading and len(leader.intervals()) == 1
        # A graceful handover still works, only slower.
        leader.terminate()
        leader.wait_exit()
        fleet.replace(leader)
    fleet.wait_leader(timeout=LEASE + 20)
    assert_safe(fleet.members)
