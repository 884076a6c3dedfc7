"""`--shards N` on the real API server: 5 replicas own 32 shards through rolling restarts and
SIGKILLs, with the chaos suite's recorder and checker per shard (tests/chaos/shard_recorder.py):
never two owners of a shard, fencing tokens growing per shard, balance within one once
membership is stable, and few shards moved per join or leave. The figures it measures are the
bench's (bench/run.py shards)."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.shard_recorder import ShardReplica, check_shards, ownership
from tests.e2e.sidecars import LEASE, TIMINGS
from tests.kube.cluster import Cluster

SHARDS, REPLICAS = 32, 5


class ShardFleet:
    def __init__(self, args: list[str], shards: int = SHARDS) -> None:
        self.args = args
        self.shards = shards
        self.everyone: list[ShardReplica] = []
        self.live: dict[str, ShardReplica] = {}

    def start(self, name: str) -> ShardReplica:
        replica = ShardReplica(name, [*TIMINGS, *self.args])
        self.everyone.append(replica)
        self.live[name] = replica
        return replica

    def stop_all(self) -> None:
        for replica in self.everyone:
            replica.stop()

    def owners(self) -> dict[int, list[str]]:
        return ownership(list(self.live.values()))

    def balanced(self) -> bool:
        owners = self.owners()
        if len(owners) != self.shards or any(len(o) != 1 for o in owners.values()):
            return False
        counts = {name: 0 for name in self.live}
        for (name,) in owners.values():
            counts[name] = counts.get(name, 0) + 1
        return max(counts.values()) - min(counts.values()) <= 1

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            time.sleep(0.005)
        raise AssertionError(f"{what} not within {timeout}s: {self.owners()}")

    def settle(self, timeout: float = 4 * LEASE + 5) -> float:
        return self.wait(self.balanced, timeout, "all shards owned once, balanced within one")

    def snapshot(self) -> dict[int, str]:
        return {shard: names[0] for shard, names in self.owners().items() if len(names) == 1}


@pytest.fixture
def shard_fleet(kube_cluster: Cluster, namespace: str) -> Iterator[ShardFleet]:
    fleet = ShardFleet(
        [
            "--kubeconfig",
            str(kube_cluster.kubeconfig),
            "--namespace",
            namespace,
            "--election",
            "sharded",
            "--shards",
            str(SHARDS),
        ]
    )
    try:
        yield fleet
    finally:
        fleet.stop_all()


def _owned_since(fleet: ShardFleet, shard: int, since: float) -> float:
    """When a live replica's app first heard it owns `shard`, at or after `since`."""
    seen = []
    for replica in fleet.live.values():
        with replica._changed:
            events = list(replica.events)
        for arrived, snapshot in events:
            if arrived >= since and any(o["shard"] == shard for o in snapshot.get("owned", [])):
                seen.append(arrived)
                break
    return min(seen)


def _moves(before: dict[int, str], after: dict[int, str]) -> int:
    return sum(1 for shard in range(SHARDS) if before.get(shard) != after.get(shard))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@pytest.mark.timeout(600)
def test_32_shards_over_5_replicas_through_rolling_restarts_and_kills(
    shard_fleet: ShardFleet, kube_cluster: Cluster, namespace: str
) -> None:
    fleet = shard_fleet
    for i in range(REPLICAS):
        fleet.start(f"replica-{i}")
    for replica in fleet.live.values():
        replica.wait_started(timeout=60)
    first = fleet.settle(timeout=6 * LEASE + 20)
    graceful: list[float] = []
    crash: list[float] = []
    moves: dict[str, list[int]] = {"leave": [], "join": [], "crash": []}

    def take_out(name: str, kill: bool) -> None:
        before = fleet.snapshot()
        victim = fleet.live.pop(name)
        mine = [shard for shard, owner in before.items() if owner == name]
        started = time.monotonic()
        victim.kill() if kill else victim.terminate()

        def moved() -> bool:
            owners = fleet.owners()
            return all(len(owners.get(shard, [])) == 1 for shard in mine)

        fleet.wait(moved, LEASE + 10, f"{name}'s shards owned elsewhere")
        # From the signal to the kernel's receive time of the last of its shards' "yours now".
        each = sorted(_owned_since(fleet, shard, started) - started for shard in mine)
        took = each[-1]
        if os.environ.get("LEADER_SIDECAR_SHARD_DEBUG"):
            print(name, "kill" if kill else "term", [round(t * 1000) for t in each])
        (crash if kill else graceful).append(took)
        fleet.settle()
        moves["crash" if kill else "leave"].append(_moves(before, fleet.snapshot()))
        victim.wait_exit(timeout=20)

    def bring_back(name: str) -> None:
        before = fleet.snapshot()
        fleet.start(name).wait_started(timeout=60)
        fleet.settle()
        time.sleep(0.5)  # nothing more moves once settled
        fleet.settle()
        moves["join"].append(_moves(before, fleet.snapshot()))

    # A rolling restart, one replica after the other, twice over.
    for _ in range(2):
        for i in range(REPLICAS):
            take_out(f"replica-{i}", kill=False)
            bring_back(f"replica-{i}")
    # SIGKILLs.
    for i in (1, 3, 0):
        take_out(f"replica-{i}", kill=True)
        bring_back(f"replica-{i}")

    fleet.stop_all()
    reports = check_shards(fleet.everyone, SHARDS)
    violations = [v for r in reports for v in r.violations]
    assert not violations, "\n".join(violations[:10])
    bound = math.ceil(SHARDS / REPLICAS) + 1
    assert max(moves["leave"] + moves["join"]) <= bound, moves
    figures: dict[str, Any] = {
        "shards": SHARDS,
        "replicas": REPLICAS,
        "lease_duration_s": LEASE,
        "first_settled_s": round(first, 3),
        "graceful_rebalance_ms": {
            "p50": round(statistics.median(graceful) * 1000, 1),
            "p90": round(_percentile(graceful, 0.9) * 1000, 1),
            "n": len(graceful),
        },
        "crash_rebalance_s": {
            "p50": round(statistics.median(crash), 3),
            "max": round(max(crash), 3),
            "n": len(crash),
        },
        "moves_per_change": {k: v for k, v in moves.items()},
        "ownership_intervals": sum(len(r.intervals) for r in reports),
        "double_ownerships": len(violations),
    }
    print("\n[shards] " + json.dumps(figures))
    out = os.environ.get("LEADER_SIDECAR_SHARD_FIGURES")
    if out:
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")
    assert max(crash) <= LEASE + 1.0, figures


def test_the_local_backend_shards_processes_on_one_machine(tmp_path: Path) -> None:
    """`leader-sidecar run --election demo --shards 8` in three terminals, as the README says."""
    shards = 8
    args = ["--backend", "local", "--local-dir", str(tmp_path), "--election", "demo"]
    fleet = ShardFleet([*args, "--shards", str(shards)], shards)
    try:
        for i in range(3):
            fleet.start(f"terminal-{i}")
        for replica in fleet.live.values():
            replica.wait_started()
        fleet.settle()
        before = fleet.snapshot()
        leaving = fleet.live.pop("terminal-1")
        leaving.terminate()
        assert leaving.wait_exit() == 0
        fleet.settle()
        after = fleet.snapshot()
        assert set(after.values()) == {"terminal-0", "terminal-2"}
        moved = [s for s in range(shards) if before[s] != after[s]]
        assert all(before[s] == "terminal-1" for s in moved)  # only the leaver's shards moved
        fleet.start("terminal-1").wait_started()
        fleet.settle()
        assert sorted(set(fleet.snapshot().values())) == ["terminal-0", "terminal-1", "terminal-2"]
    finally:
        fleet.stop_all()
    reports = check_shards(fleet.everyone, shards)
    assert not [v for r in reports for v in r.violations]
