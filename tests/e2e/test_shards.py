"""`--shards N` on the real API server: 5 replicas own 32 shards through rolling restarts and
SIGKILLs, with the chaos suite's recorder and checker per shard (tests/chaos/shard_recorder.py):
never two owners of a shard, fencing tokens growing per shard, balance within one once
membership is stable, and few shards moved per join or leave. The figures it measures are the
bench's (bench/run.py shards)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.shard_recorder import ShardFleet, check_shards, rebalance_scenario
from tests.e2e.sidecars import LEASE
from tests.kube.cluster import Cluster

SHARDS, REPLICAS = 32, 5


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
        ],
        SHARDS,
    )
    try:
        yield fleet
    finally:
        fleet.stop_all()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@pytest.mark.timeout(600)
def test_32_shards_over_5_replicas_through_rolling_restarts_and_kills(
    shard_fleet: ShardFleet,
) -> None:
    fleet = shard_fleet
    debug = bool(os.environ.get("LEADER_SIDECAR_SHARD_DEBUG"))
    figures = rebalance_scenario(fleet, REPLICAS, rounds=2, kills=(1, 3, 0), debug=debug)
    fleet.stop_all()
    reports = check_shards(fleet.everyone, SHARDS)
    violations = [v for r in reports for v in r.violations]
    assert not violations, "\n".join(violations[:10])
    figures["ownership_intervals"] = sum(len(r.intervals) for r in reports)
    figures["double_ownerships"] = len(violations)
    print("\n[shards] " + json.dumps({k: v for k, v in figures.items() if not k.endswith("_s")}))
    out = os.environ.get("LEADER_SIDECAR_SHARD_FIGURES")
    if out:
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")
    moved = figures["moves_per_change"]
    assert max(moved["leave"] + moved["join"]) <= math.ceil(SHARDS / REPLICAS) + 1, moved
    assert max(figures["crash_s"]) <= LEASE + 1.0, figures


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
