"""Soak: random faults against a fleet on a real API server for N minutes, with the chaos suite's
recorder and no-double-leader checker over every replica that ever ran.

    python scripts/soak.py --minutes 30 [--replicas 4] [--seed 1] [--json out.json]

Faults (weighted, one at a time, each followed by recovery to one leader that all replicas name):
SIGTERM or SIGKILL of the leader, a resign, the leader or a follower black-holed by toxiproxy
and healed, a 409 storm, a foreign holder, the whole fleet restarted, the API server or etcd
restarted. Prints trials, handovers, violations (must be 0; exit code 1 otherwise) and the
longest time without any leader, overall and per fault.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos.fleet import LEASE, Fleet, RecordedReplica, write_kubeconfig
from tests.chaos.test_writers import HostileWriter
from tests.chaos.toxiproxy import Proxy, Toxiproxy
from tests.kube.cluster import Cluster


class Soak:
    def __init__(self, cluster: Cluster, toxiproxy: Toxiproxy, workdir: Path, replicas: int):
        status, body = cluster.api(
            "POST", "/api/v1/namespaces", {"metadata": {"name": f"soak-{secrets.token_hex(3)}"}}
        )
        assert status == 201, body
        self.fleet = Fleet(cluster, body["metadata"]["name"], workdir, election="soak")
        self.toxiproxy = toxiproxy
        self.proxies: dict[str, Proxy] = {}
        self.size = replicas
        self.verbose = False
        self.rng = random.Random()
        self.incidents: list[str] = []
        self.history: list[str] = []
        self.generation = 0
        for i in range(replicas):
            self._start(f"p{i}")

    def _start(self, slot: str) -> RecordedReplica:
        """Each replica slot has its own proxy, so that any one of them can be cut off. A
        restarted replica comes back as a new pod would: with a new identity."""
        if slot not in self.proxies:
            self.proxies[slot] = self.toxiproxy.proxy(slot, self.fleet.cluster.port)
        kubeconfig = write_kubeconfig(
            self.fleet.cluster,
            self.fleet.workdir / f"kubeconfig-{slot}",
            server=self.proxies[slot].url,
        )
        self.generation += 1
        name = f"{slot}.{self.generation}"
        return self.fleet.start(args=self.fleet.args(kubeconfig), names=[name])[0]

    def _restart_dead(self) -> None:
        live = {r.name.split(".")[0] for r in self.fleet.live()}
        for i in range(self.size):
            if f"p{i}" not in live:
                self._start(f"p{i}")

    def _lease_path(self) -> str:
        f = self.fleet
        return f"/apis/coordination.k8s.io/v1/namespaces/{f.namespace}/leases/{f.lease_name()}"

    # ------------------------------------------------------------------ faults

    def sigterm(self, leader: RecordedReplica) -> None:
        leader.terminate()
        self._reap(leader)

    def _reap(self, replica: RecordedReplica) -> None:
        try:
            replica.wait_exit(timeout=15)
        except AssertionError as exc:  # it hung: the message holds its log and stacks
            self.incidents.append(str(exc))
            print(f"[soak] INCIDENT {exc}", flush=True)

    def sigkill(self, leader: RecordedReplica) -> None:
        leader.kill()
        leader.wait_exit()

    def resign(self, leader: RecordedReplica) -> None:
        leader.request("POST", "/leader/resign")

    def partition_leader(self, leader: RecordedReplica) -> None:
        self._partition(leader)

    def partition_follower(self, leader: RecordedReplica) -> None:
        victim = self.rng.choice([r for r in self.fleet.live() if r is not leader])
        self._partition(victim)

    def _partition(self, victim: RecordedReplica) -> None:
        proxy = self.proxies[victim.name.split(".")[0]]
        proxy.black_hole()
        try:
            victim.wait_for(lambda s: s.get("state") == "unknown", timeout=3 * LEASE + 10)
        finally:
            proxy.heal()

    def storm(self, leader: RecordedReplica) -> None:
        writer = HostileWriter(self.fleet.cluster, self._lease_path(), seconds=1.0)
        writer.start()
        writer.join()

    def intruder(self, leader: RecordedReplica) -> None:
        cluster = self.fleet.cluster
        status, lease = cluster.api("GET", self._lease_path())
        if status != 200:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease["spec"].update(
            holderIdentity="intruder",
            leaseDurationSeconds=int(LEASE),
            renewTime=now,
            acquireTime=now,
            leaseTransitions=lease["spec"]["leaseTransitions"] + 1,
        )
        cluster.api("PUT", self._lease_path(), lease)

    def fleet_restart(self, leader: RecordedReplica) -> None:
        sig = self.rng.choice([signal.SIGTERM, signal.SIGKILL])
        live = self.fleet.live()
        for replica in live:
            replica.proc.send_signal(sig)
        for replica in live:
            self._reap(replica)

    def apiserver(self, leader: RecordedReplica) -> None:
        self.fleet.cluster.stop_apiserver(kill=True)
        self.fleet.cluster.start_apiserver()

    def etcd(self, leader: RecordedReplica) -> None:
        self.fleet.cluster.stop_etcd(kill=True)
        self.fleet.cluster.start_etcd()

    def faults(self) -> list[tuple[Callable[[RecordedReplica], None], int]]:
        return [
            (self.sigterm, 30),
            (self.resign, 20),
            (self.sigkill, 10),
            (self.storm, 10),
            (self.intruder, 5),
            (self.partition_leader, 6),
            (self.partition_follower, 4),
            (self.fleet_restart, 3),
            (self.apiserver, 1),
            (self.etcd, 1),
        ]

    # -------------------------------------------------------------------- run

    def run(self, minutes: float, seed: int) -> dict[str, object]:
        self.rng.seed(seed)
        faults = self.faults()
        trials: dict[str, int] = defaultdict(int)
        recovery: dict[str, float] = defaultdict(float)
        end = time.monotonic() + minutes * 60
        started = time.monotonic()
        last_print = started
        while time.monotonic() < end:
            leader = self.fleet.wait_leader(timeout=60)
            fault = self.rng.choices([f for f, _ in faults], [w for _, w in faults])[0]
            began = time.monotonic()
            self.history.append(f"{began:.3f} {fault.__name__} (leader {leader.name})")
            if self.verbose:
                print(f"[soak] {self.history[-1]}", flush=True)
            fault(leader)
            self._restart_dead()
            self.fleet.wait_leader(timeout=60)
            name = fault.__name__
            trials[name] += 1
            recovery[name] = max(recovery[name], time.monotonic() - began)
            if time.monotonic() - last_print > 60:
                last_print = time.monotonic()
                report = self.fleet.check()
                print(
                    f"[soak] {(last_print - started) / 60:.1f} min, {sum(trials.values())} "
                    f"trials: {report.summary()}",
                    flush=True,
                )
        self.fleet.stop_all()
        report = self.fleet.check()
        return {
            "minutes": round((time.monotonic() - started) / 60, 1),
            "replicas": self.size,
            "seed": seed,
            "trials": sum(trials.values()),
            "trials_by_fault": dict(trials),
            "handovers": report.handovers,
            "leadership_intervals": len(report.intervals),
            "violations": report.violations,
            "min_gap_between_leaders_ms": round(report.min_gap * 1000, 1),
            "max_time_without_leader_s": round(report.max_leaderless, 3),
            "max_recovery_s_by_fault": {k: round(v, 3) for k, v in recovery.items()},
            "incidents": self.incidents,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--verbose", action="store_true", help="print every fault")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    with tempfile.TemporaryDirectory(prefix="leader-sidecar-soak.") as tmp:
        workdir = Path(tmp)
        with Cluster(workdir / "kube") as cluster, Toxiproxy(workdir) as toxiproxy:
            soak = Soak(cluster, toxiproxy, workdir, args.replicas)
            soak.verbose = args.verbose
            result = soak.run(args.minutes, seed)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"soak: {result['minutes']} min, {result['trials']} trials, {result['handovers']} "
        f"handovers, {len(result['violations'])} violations, "  # type: ignore[arg-type]
        f"max {result['max_time_without_leader_s']} s without a leader"
    )
    return 1 if result["violations"] or result["incidents"] else 0


if __name__ == "__main__":
    sys.exit(main())
