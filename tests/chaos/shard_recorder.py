"""The chaos recorder and checker, for shards: every replica's `/shards?watch=true` stream is
read with the kernel's receive timestamps (as recorder.Replica does for `/leader`), and each
shard's ownership intervals across all replicas go through the same checker: never two owners
of a shard at overlapping moments, fencing tokens growing per shard."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence

from tests.chaos.recorder import SO_TIMESTAMPNS, Interval, Report, _arrival, check
from tests.e2e.sidecars import Sidecar, Snapshot


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
