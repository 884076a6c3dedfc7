"""The recorder and the no-double-leader checker of the chaos suite (and of scripts/soak.py).

Recorder: every replica's `/leader?watch=true` stream is read with the kernel's receive
timestamp of each TCP segment (SO_TIMESTAMPNS), converted to this machine's CLOCK_MONOTONIC. That
is the moment the sidecar's words reached its app, whatever the test process's threads were doing
then: a reader thread starved by the GIL or a loaded CPU cannot reorder two replicas' messages.
client-go electors (bench/clientgo) print CLOCK_MONOTONIC times themselves; CLOCK_MONOTONIC is
system-wide on Linux, so all times compare.

Checker: leadership intervals [told "you lead", told "you do not" or the stream/process ended)
of all replicas of one election must not overlap; fencing tokens must grow from one holder to the
next. It also measures handovers, the smallest gap between two leaders (the safety margin that
was left) and the longest time without any leader.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.e2e.sidecars import Sidecar, Snapshot

# SO_TIMESTAMPNS (SO_TIMESTAMPNS_OLD on 64-bit Linux); Python does not export the constant.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("qq")


@dataclass(frozen=True)
class Interval:
    member: str  # who led: one process ("name[pid]"); a restarted replica is a new member
    identity: str  # the identity it holds the Lease under (a restart may keep it)
    start: float  # CLOCK_MONOTONIC
    end: float  # inf while still leading
    token: int | None = None  # fencing token the member was told


class Member(Protocol):
    name: str

    def intervals(self) -> list[Interval]: ...

    def terminate(self) -> None: ...

    def stop(self) -> None: ...


class Replica(Sidecar):
    """A `leader-sidecar run` process whose SSE stream is recorded with kernel timestamps."""

    def _follow(self) -> None:
        request = (
            b"GET /leader?watch=true HTTP/1.0\r\nHost: 127.0.0.1\r\n"
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
                        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(
                            b"HTTP/1.0 200"
                        ):
                            break
                        headers_done, buffer = True, rest
                    *complete, buffer = buffer.split(b"\n\n")
                    for event in complete:
                        for line in event.split(b"\n"):
                            if line.startswith(b"data: "):
                                self._record(arrived, json.loads(line[6:]))
        except OSError:
            pass
        # The app's stream is gone (the process died): it hears nothing more from here.
        self._record(time.monotonic(), {"is_leader": False, "stream_ended": True})

    def _record(self, arrived: float, snapshot: Snapshot) -> None:
        with self._changed:
            self.events.append((arrived, snapshot))
            self._changed.notify_all()

    def intervals(self) -> list[Interval]:
        with self._changed:
            events = list(self.events)
        out, start, token = [], None, None
        for arrived, snapshot in events:
            if snapshot.get("is_leader") and start is None:
                start, token = arrived, snapshot.get("fencing_token")
            elif not snapshot.get("is_leader") and start is not None:
                out.append(Interval(self.member, self.name, start, arrived, token))
                start = None
        if start is not None:
            out.append(Interval(self.member, self.name, start, float("inf"), token))
        return out

    @property
    def member(self) -> str:
        return f"{self.name}[{self.proc.pid}]"

    @property
    def leading(self) -> bool:
        return bool(self.latest.get("is_leader"))


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """The kernel's receive time of the data just read, on CLOCK_MONOTONIC."""
    now_mono, now_real = time.monotonic(), time.time()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanos = _TIMESPEC.unpack(data[:16])
            received = float(seconds) + float(nanos) / 1e9
            return min(now_mono, now_mono - (now_real - received))
    return now_mono


class ClientGoReplica:
    """A client-go elector (bench/clientgo) as a chaos-suite member.

    Its leadership interval runs from OnStartedLeading to the earlier of "stopping" (SIGTERM
    received: client-go requires the guarded work to end before the context is cancelled when
    ReleaseOnCancel is on) and OnStoppedLeading, or to the process's end.
    """

    def __init__(self, binary: Path, name: str, args: list[str]) -> None:
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [str(binary), "--id", name, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def member(self) -> str:
        return f"{self.name}[{self.proc.pid}]"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self.events.append({"event": "exit", "mono": time.monotonic()})
            self._changed.notify_all()

    def wait_event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        with self._changed:
            self._changed.wait_for(lambda: any(e["event"] == name for e in self.events), timeout)
            for event in self.events:
                if event["event"] == name:
                    return event
        raise AssertionError(f"{self.name}: no {name!r} within {timeout}s: {self.events}")

    @property
    def leading(self) -> bool:
        with self._changed:
            state = False
            for event in self.events:
                if event["event"] == "started_leading":
                    state = True
                elif event["event"] in ("stopping", "stopped_leading", "exit"):
                    state = False
            return state

    def intervals(self) -> list[Interval]:
        with self._changed:
            events = list(self.events)
        out, start = [], None
        for event in events:
            if event["event"] == "started_leading" and start is None:
                start = float(event["mono"])
            elif event["event"] in ("stopping", "stopped_leading", "exit") and start is not None:
                out.append(Interval(self.member, self.name, start, float(event["mono"])))
                start = None
        if start is not None:
            out.append(Interval(self.member, self.name, start, float("inf")))
        return out

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ------------------------------------------------------------------------------- checker


@dataclass
class Report:
    intervals: list[Interval] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    handovers: int = 0  # leadership passed from one member to another
    min_gap: float = float("inf")  # smallest time between one leader's end and the next start
    max_leaderless: float = 0.0  # longest time without a leader, first start to last end

    def summary(self) -> str:
        gap = f"{self.min_gap * 1000:.1f} ms" if self.min_gap != float("inf") else "n/a"
        return (
            f"{len(self.intervals)} leadership intervals, {self.handovers} handovers, "
            f"{len(self.violations)} violations, smallest gap between leaders {gap}, "
            f"longest time without a leader {self.max_leaderless:.3f} s"
        )


def check(members: Iterable[Member]) -> Report:
    """No two members' leadership intervals overlap; fencing tokens grow between holders."""
    report = Report(sorted((i for m in members for i in m.intervals()), key=lambda i: i.start))
    previous: Interval | None = None  # the interval that ends last so far
    for interval in report.intervals:
        if previous is not None:
            gap = interval.start - previous.end
            if gap < 0:
                report.violations.append(
                    f"{previous.member} led until {previous.end:.6f} and {interval.member} "
                    f"from {interval.start:.6f} ({-gap * 1000:.3f} ms overlap)"
                )
            else:
                report.max_leaderless = max(report.max_leaderless, gap)
            if interval.member != previous.member:
                report.handovers += 1
                report.min_gap = min(report.min_gap, gap)
                old, new = previous.token, interval.token
                same = interval.identity == previous.identity  # it may take its own Lease back
                if old is not None and new is not None and (new < old or (new == old and not same)):
                    report.violations.append(
                        f"fencing token went from {old} ({previous.member}) to {new} "
                        f"({interval.member})"
                    )
        if previous is None or interval.end > previous.end:
            previous = interval
    return report


def assert_safe(members: Sequence[Member]) -> Report:
    report = check(members)
    assert not report.violations, "\n".join([report.summary(), *report.violations])
    return report
