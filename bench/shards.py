"""Shards on the real API server (`bench/run.py --shards-only`, or part of the full run):
N shards over M `leader-sidecar run --shards N` replicas, recorded with the chaos recorder.

- graceful rebalance: SIGTERM to a replica -> every one of its shards owned (its app told)
  elsewhere: p50 / p90 over a rolling restart of every replica, `rounds` times;
- crash rebalance: SIGKILL -> the same, for `kills` replicas;
- shards moved per leave, join and crash;
- API writes per second per replica in steady state (the sidecars' own request counters:
  PUT, POST and DELETE), and RSS per replica, at N shards;
- double ownerships found by the checker (must be 0).
"""

from __future__ import annotations

import re
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.chaos.shard_recorder import ShardFleet, check_shards, rebalance_scenario
from tests.kube.cluster import Cluster

WRITE_VERBS = ("PUT", "POST", "DELETE")
_COUNT = re.compile(
    r'^leader_sidecar_api_request_duration_seconds_count\{verb="(\w+)"\} ([0-9.e+]+)$', re.M
)


def _writes(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for verb, v in _COUNT.findall(text) if verb in WRITE_VERBS)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def shard_bench(
    cluster: Cluster,
    namespace: str,
    timings: tuple[float, float, float],
    shards: int = 32,
    replicas: int = 5,
    rounds: int = 2,
    kills: tuple[int, ...] = (1, 3, 0),
    idle_seconds: float = 20.0,
) -> dict[str, Any]:
    lease, renew, retry = timings
    fleet = ShardFleet(
        [
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--namespace",
            namespace,
            "--election",
            "bench-shards",
            "--shards",
            str(shards),
        ],
        shards,
    )
    fleet.timings = [
        "--lease-duration",
        f"{lease:g}s",
        "--renew-deadline",
        f"{renew:g}s",
        "--retry-period",
        f"{retry:g}s",
    ]
    fleet.lease = int(lease)
    try:
        figures = rebalance_scenario(fleet, replicas, rounds, kills)
        # Steady state: nothing moves; count writes and memory.
        fleet.settle()
        live = list(fleet.live.values())
        before = [_writes(r.port) for r in live]
        time.sleep(idle_seconds)
        after = [_writes(r.port) for r in live]
        rates = [(b - a) / idle_seconds for a, b in zip(before, after, strict=True)]
        figures["writes_per_second_per_replica"] = {
            "mean": round(statistics.mean(rates), 2),
            "max": round(max(rates), 2),
            "expected": round(shards / retry / replicas + 3 / lease, 2),
        }
        figures["rss_mib_per_replica"] = round(
            statistics.mean(_rss_kib(r.proc.pid) for r in live) / 1024, 1
        )
    finally:
        fleet.stop_all()
    reports = check_shards(fleet.everyone, shards)
    violations = [v for r in reports for v in r.violations]
    figures["ownership_intervals"] = sum(len(r.intervals) for r in reports)
    figures["double_ownerships"] = len(violations)
    figures["violations"] = violations[:10]
    return figures


def shard_table(figures: dict[str, Any]) -> str:
    g, c = figures["graceful_rebalance_ms"], figures.get("crash_rebalance_s", {})
    moved = figures["moves_per_change"]

    def span(values: list[int]) -> str:
        return f"{min(values)}-{max(values)}" if values else "n/a"

    rows = [
        (
            "graceful rebalance, SIGTERM -> all its shards owned elsewhere (p50 / p90)",
            f"{g['p50']:.0f} ms / {g['p90']:.0f} ms (n={g['n']})",
            "p50 <= 200 ms",
        ),
        (
            "crash rebalance, SIGKILL -> all its shards owned elsewhere (p50 / max)",
            f"{c.get('p50', 0):.2f} s / {c.get('max', 0):.2f} s (n={c.get('n', 0)}), "
            f"lease {figures['lease_duration_s']} s",
            "<= lease duration + 1 s",
        ),
        (
            "shards moved per leave / join / crash",
            f"{span(moved['leave'])} / {span(moved['join'])} / {span(moved['crash'])}",
            "<= ceil(N/M) + 1",
        ),
        (
            "API writes per second per replica, steady (mean / max; expected)",
            f"{figures['writes_per_second_per_replica']['mean']} / "
            f"{figures['writes_per_second_per_replica']['max']}; "
            f"{figures['writes_per_second_per_replica']['expected']}",
            "N / retry / M + members",
        ),
        ("RSS per replica", f"{figures['rss_mib_per_replica']} MiB", ""),
        (
            "double ownerships (ownership intervals checked)",
            f"{figures['double_ownerships']} ({figures['ownership_intervals']})",
            "0",
        ),
    ]
    head = (
        f"| {figures['shards']} shards over {figures['replicas']} replicas | measured | bar |\n"
        "|---|---|---|\n"
    )
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
