"""The chaos recorder and checker, for shards: every replica's `/shards?watch=true` stream is
read with the kernel's receive timestamps (as recorder.Replica does for `/leader`), and each
shard's ownership intervals across all replicas go through the same checker: never two owners
of a shard at overlapping moments, fencing tokens growing per shard."""

from __future__ import annotations

import json
import math
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from tests.chaos.recorder import SO_TIMESTAMPNS, Interval, Report, _arrival, check
from tests.e2e.sidecars import LEASE, TIMINGS, Sidecar, Snapshot


class ShardReplica(Sidecar):
    """A `leader-sidecar run --shards N` process whose `/shards` stream is recorded."""

    def _follow(self) -> None:
        request = (
            b"GET /shards?watch=true HTTP/1.0\r\nHost: 127.0.0.1\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )
        buffer = b""
        headers_done = False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=None) as sock:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                sock.sendall(request)
                while True:
                    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16))
                    arrived = _arrival(ancillary)
                    if not data:
                        break
                    buffer += data
                    if not headers_done:
                        head, sep, rest = buffer.partition(b"\r\n\r\n")
                        if not sep:
                            continue
                        if b" 200 " not in head.split(b"\r\n", 1)[0]:
                            break
                        headers_done, buffer = True, rest
                    *complete, buffer = buffer.split(b"\n\n")
                    for event in complete:
                        for line in event.split(b"\n"):
                            if line.startswith(b"data: "):
                                self._record(arrived, json.loads(line[6:]))
        except OSError:
            pass
        self._record(time.monotonic(), {"owned": [], "stream_ended": True})

    def _record(self, arrived: float, snapshot: Snapshot) -> None:
        with self._changed:
            self.events.append((arrived, snapshot))
            self._changed.notify_all()

    @property
    def member(self) -> str:
        return f"{self.name}[{self.proc.pid}]"

    def owned(self) -> dict[int, int]:
        """Shard -> fencing token, as the app was last told."""
        snapshot = self.latest
        return {o["shard"]: o["fencing_token"] for o in snapshot.get("owned", [])}

    def shard_intervals(self, shard: int) -> list[Interval]:
        with self._changed:
            events = list(self.events)
        out: list[Interval] = []
        start: float | None = None
        token: int | None = None
        for arrived, snapshot in events:
            tokens = {o["shard"]: o["fencing_token"] for o in snapshot.get("owned", [])}
            if shard in tokens and start is not None and tokens[shard] != token:
                out.append(Interval(self.member, self.name, start, arrived, token))
                start = None
            if shard in tokens and start is None:
                start, token = arrived, tokens[shard]
            elif shard not in tokens and start is not None:
                out.append(Interval(self.member, self.name, start, arrived, token))
                start = None
        if start is not None:
            out.append(Interval(self.member, self.name, start, float("inf"), token))
        return out


class _ShardView:
    def __init__(self, replica: ShardReplica, shard: int) -> None:
        self.replica = replica
        self.shard = shard
        self.name = replica.name

    def intervals(self) -> list[Interval]:
        return self.replica.shard_intervals(self.shard)

    def terminate(self) -> None:
        self.replica.terminate()

    def stop(self) -> None:
        self.replica.stop()


def check_shards(replicas: Sequence[ShardReplica], shards: int) -> list[Report]:
    """One report per shard, from every replica process that ever ran."""
    return [check([_ShardView(r, shard) for r in replicas]) for shard in range(shards)]


def ownership(replicas: Sequence[ShardReplica]) -> dict[int, list[str]]:
    """Shard -> the live replicas whose app was last told it owns it."""
    owners: dict[int, list[str]] = {}
    for replica in replicas:
        if replica.proc.poll() is not None:
            continue
        for shard in replica.owned():
            owners.setdefault(shard, []).append(replica.name)
    return owners


class ShardFleet:
    def __init__(self, args: list[str], shards: int) -> None:
        self.args = args
        self.shards = shards
        self.timings = list(TIMINGS)
        self.lease = LEASE
        self.everyone: list[ShardReplica] = []
        self.live: dict[str, ShardReplica] = {}

    def start(self, name: str) -> ShardReplica:
        replica = ShardReplica(name, [*self.timings, *self.args])
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

    def settle(self, timeout: float | None = None) -> float:
        timeout = timeout if timeout is not None else 4 * self.lease + 5
        return self.wait(self.balanced, timeout, "all shards owned once, balanced within one")

    def snapshot(self) -> dict[int, str]:
        return {shard: names[0] for shard, names in self.owners().items() if len(names) == 1}


def owned_since(fleet: ShardFleet, shard: int, since: float) -> float:
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


def moves(before: dict[int, str], after: dict[int, str]) -> int:
    return sum(1 for shard in set(before) | set(after) if before.get(shard) != after.get(shard))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def rebalance_scenario(
    fleet: ShardFleet, replicas: int, rounds: int, kills: Sequence[int], debug: bool = False
) -> dict[str, Any]:
    """Start `replicas` replicas, settle; then `rounds` rolling restarts (SIGTERM, start again,
    one replica after the other) and a SIGKILL (and restart) of each replica in `kills`.
    Returns the figures (rebalance times from the signal to the kernel's receive time of the
    last of the victim's shards' "yours now" elsewhere; shards moved per change)."""
    for i in range(replicas):
        fleet.start(f"replica-{i}")
    for replica in fleet.live.values():
        replica.wait_started(timeout=60)
    first = fleet.settle(timeout=6 * fleet.lease + 20)
    graceful: list[float] = []
    crash: list[float] = []
    moved: dict[str, list[int]] = {"leave": [], "join": [], "crash": []}

    def take_out(name: str, kill: bool) -> None:
        before = fleet.snapshot()
        victim = fleet.live.pop(name)
        mine = [shard for shard, owner in before.items() if owner == name]
        started = time.monotonic()
        victim.kill() if kill else victim.terminate()

        def elsewhere() -> bool:
            owners = fleet.owners()
            return all(len(owners.get(shard, [])) == 1 for shard in mine)

        fleet.wait(elsewhere, fleet.lease + 10, f"{name}'s shards owned elsewhere")
        each = sorted(owned_since(fleet, shard, started) - started for shard in mine)
        if debug:
            print(name, "kill" if kill else "term", [round(t * 1000) for t in each])
        (crash if kill else graceful).append(each[-1])
        fleet.settle()
        moved["crash" if kill else "leave"].append(moves(before, fleet.snapshot()))
        victim.wait_exit(timeout=20)

    def bring_back(name: str) -> None:
        before = fleet.snapshot()
        fleet.start(name).wait_started(timeout=60)
        fleet.settle()
        time.sleep(0.5)  # nothing more moves once settled
        fleet.settle()
        moved["join"].append(moves(before, fleet.snapshot()))

    for _ in range(rounds):
        for i in range(replicas):
            take_out(f"replica-{i}", kill=False)
            bring_back(f"replica-{i}")
    for i in kills:
        take_out(f"replica-{i}", kill=True)
        bring_back(f"replica-{i}")
    figures: dict[str, Any] = {
        "shards": fleet.shards,
        "replicas": replicas,
        "lease_duration_s": fleet.lease,
        "first_settled_s": round(first, 3),
        "graceful_rebalance_ms": {
            "p50": round(statistics.median(graceful) * 1000, 1),
            "p90": round(_percentile(graceful, 0.9) * 1000, 1),
            "n": len(graceful),
        },
        "moves_per_change": moved,
        "graceful_s": graceful,
        "crash_s": crash,
    }
    if crash:
        figures["crash_rebalance_s"] = {
            "p50": round(statistics.median(crash), 3),
            "max": round(max(crash), 3),
            "n": len(crash),
        }
    return figures
