"""An independent observer of one Lease: a raw watch on the API server in a thread, recording
every version of the record with this process's monotonic time of arrival. Used by the node
tests and the rollout bench to count leadership changes and leaderless time, for
leader-sidecar and client-go alike (it trusts neither side's own report).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic() when the event arrived here
    holder: str  # "" when released (or deleted)
    transitions: int
    duration: float  # leaseDurationSeconds
    event: str  # ADDED, MODIFIED, DELETED


class LeaseWatch:
    """Watch `namespace/name` from `start()` until `stop()`; ``events`` holds what was seen.

    The watch resumes from the last resourceVersion when the server ends it (it does every few
    minutes), so nothing in between is lost.
    """

    def __init__(
        self, host: str, port: int, token: str, ctx: ssl.SSLContext, namespace: str, name: str
    ) -> None:
        self._host, self._port, self._token, self._ctx = host, port, token, ctx
        self.namespace, self.name = namespace, name
        self.events: list[Seen] = []
        self._stop = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> LeaseWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._conn is not None:
            sock = self._conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(2)
        self._thread.join(timeout=10)

    def __enter__(self) -> LeaseWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        version = ""
        path = (
            f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"
            f"?watch=true&fieldSelector=metadata.name%3D{self.name}&allowWatchBookmarks=true"
        )
        while not self._stop.is_set():
            try:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, context=self._ctx, timeout=3600
                )
                q = f"&resourceVersion={version}" if version else ""
                self._conn.request(
                    "GET", path + q, headers={"Authorization": f"Bearer {self._token}"}
                )
                resp = self._conn.getresponse()
                if resp.status != 200:
                    raise RuntimeError(f"watch answered {resp.status}: {resp.read()[:200]!r}")
                while not self._stop.is_set():
                    line = resp.readline()
                    if not line:
                        break
                    at = time.monotonic()
                    ev = json.loads(line)
                    obj: dict[str, Any] = ev.get("object") or {}
                    if ev.get("type") == "ERROR":
                        version = ""  # 410 Gone: start over with a fresh list-watch
                        break
                    version = obj.get("metadata", {}).get("resourceVersion", version)
                    if ev.get("type") == "BOOKMARK":
                        continue
                    spec = obj.get("spec") or {}
                    deleted = ev.get("type") == "DELETED"
                    self.events.append(
                        Seen(
                            at=at,
                            holder="" if deleted else spec.get("holderIdentity") or "",
                            transitions=int(spec.get("leaseTransitions") or 0),
                            duration=float(spec.get("leaseDurationSeconds") or 0),
                            event=str(ev.get("type")),
                        )
                    )
            except (OSError, ValueError, RuntimeError, http.client.HTTPException) as e:
                if self._stop.is_set():
                    return
                self.error = e
                time.sleep(0.2)
            finally:
                if self._conn is not None:
                    self._conn.close()

    # -- analysis

    def holder_at(self, t: float) -> str:
        holder = ""
        for e in self.events:
            if e.at > t:
                break
            holder = e.holder
        return holder

    def wait_for(self, pred: Any, timeout: float) -> Seen:
        """Wait until an event satisfies pred(Seen); return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.events):
                e = self.events[seen]
                seen += 1
                if pred(e):
                    return e
            time.sleep(0.01)
        raise TimeoutError(f"no matching Lease event in {timeout}s; saw {self.events[-5:]}")


@dataclass(frozen=True)
class Changes:
    """Leadership between two instants, as the watch saw it."""

    holders: list[str]  # successive distinct non-empty holders, the first being the one at start
    leaderless: list[float]  # each gap's length in seconds (release -> next holder)

    @property
    def changes(self) -> int:
        return len(self.holders) - 1

    @property
    def leaderless_total(self) -> float:
        return sum(self.leaderless)


def changes_between(events: list[Seen], start: float, end: float) -> Changes:
    """Holder changes in [start, end]. A gap starts when the holder is released (empty) and
    ends when someone holds it again; a takeover without a release (a crash) counts from the
    moment the old holder's last record would have expired, as followers judge it."""
    holder = ""
    last_change = start
    holders: list[str] = []
    gaps: list[float] = []
    gap_start: float | None = None
    for e in events:
        if e.at < start:
            if e.holder != holder:
                last_change = e.at
            holder = e.holder
            continue
        if e.at > end:
            break
        if not holders and holder:
            holders.append(holder)
        if e.holder == "":
            if holder and gap_start is None:
                gap_start = e.at
        elif e.holder != holder or gap_start is not None:
            if gap_start is not None:
                gaps.append(e.at - gap_start)
                gap_start = None
            elif holder and e.holder != holder:
                # Taken over without a release: leaderless from expiry of the last renewal seen.
                gaps.append(max(0.0, e.at - (last_change + e.duration)))
            if not holders or holders[-1] != e.holder:
                holders.append(e.holder)
        holder = e.holder
        last_change = e.at
    if not holders and holder:
        holders.append(holder)
    return Changes(holders=holders, leaderless=gaps)
