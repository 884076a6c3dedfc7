"""Real `leader-sidecar run` processes for end-to-end tests, observed the way an app would.

Each Sidecar follows its own `/leader?watch=true` Server-Sent Events stream in a thread and
records every snapshot with the monotonic time it arrived, so tests wait on events (not sleeps)
and can check that no two replicas ever told their apps they lead at the same time.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Snapshot = dict[str, Any]
# Short timings keep the suite fast; the ratios are client-go's.
LEASE, RENEW, RETRY = 3, 2, 0.4
TIMINGS = [
    "--lease-duration",
    f"{LEASE}s",
    "--renew-deadline",
    f"{RENEW}s",
    "--retry-period",
    f"{RETRY}s",
]
REPO = Path(__file__).resolve().parents[2]


class Sidecar:
    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.logs: list[dict[str, Any]] = []
        self.events: list[tuple[float, Snapshot]] = []  # (monotonic arrival, /leader JSON)
        self.told: list[float] = []  # per event: when the sidecar published it (epoch seconds)
        self._changed = threading.Condition()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LEADER_SIDECAR_")}
        full_env.pop("KUBECONFIG", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "--id",
                name,
                "--http-address",
                "127.0.0.1:0",
                "--grpc-address",
                "127.0.0.1:0",
                "--log-format",
                "json",
                *args,
            ],
            cwd=REPO,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.port = 0
        threading.Thread(target=self._read_logs, daemon=True).start()

    # ------------------------------------------------------------ process

    def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"event": raw.decode(errors="replace").rstrip(), "level": "raw"}
            with self._changed:
                self.logs.append(entry)
                if entry.get("event") == "started" and not self.port:
                    self.port = int(entry["http"][0].rsplit(":", 1)[1])
                    threading.Thread(target=self._follow, daemon=True).start()
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_started(self, timeout: float = 20) -> Sidecar:
        with self._changed:
            ok = self._changed.wait_for(lambda: self.port or self.proc.poll() is not None, timeout)
        if not self.port:
            raise AssertionError(f"{self.name} did not start ({ok=}): {self.log_text()}")
        return self

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)

    def wait_exit(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait(10)

    def log_text(self) -> str:
        return "\n".join(json.dumps(entry) for entry in self.logs[-30:])

    def log_events(self, level: str | None = None) -> list[str]:
        return [e.get("event", "") for e in self.logs if level is None or e.get("level") == level]

    # --------------------------------------------------------------- HTTP

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            body = response.read()
            content_type = response.getheader("Content-Type", "")
            data = json.loads(body) if "json" in content_type else body.decode()
            return response.status, data
        finally:
            connection.close()

    def leader(self) -> Snapshot:
        status, body = self.request("GET", "/leader")
        assert status == 200
        assert isinstance(body, dict)
        return body

    def _follow(self) -> None:
        """Record every SSE snapshot with its arrival time, until the process goes away."""
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=None)
            connection.request("GET", "/leader", headers={"Accept": "text/event-stream"})
            response = connection.getresponse()
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    snapshot = json.loads(line[6:])
                    with self._changed:
                        self.events.append((time.monotonic(), snapshot))
                        self.told.append(_published(snapshot))
                        self._changed.notify_all()
        except (OSError, http.client.HTTPException):
            pass
        with self._changed:
            # The app's stream is gone (the process died): it hears nothing more from here.
            self.events.append((time.monotonic(), {"is_leader": False, "stream_ended": True}))
            self.told.append(time.time())
            self._changed.notify_all()

    @property
    def latest(self) -> Snapshot:
        with self._changed:
            return self.events[-1][1] if self.events else {}

    def wait_for(self, predicate: Callable[[Snapshot], bool], timeout: float = 20) -> float:
        """Wait until a streamed snapshot satisfies `predicate`; its arrival time."""

        def found() -> float | None:
            for arrived, snapshot in reversed(self.events):
                if predicate(snapshot):
                    return arrived
                break  # only the newest state counts
            return None

        with self._changed:
            self._changed.wait_for(
                lambda: found() is not None or self.proc.poll() is not None, timeout
            )
            arrived = found()
        if arrived is None:
            raise AssertionError(
                f"{self.name}: no matching state within {timeout}s; latest {self.latest}\n"
                f"{self.log_text()}"
            )
        return arrived

    def leader_intervals(self) -> list[tuple[float, float]]:
        """When this replica told its app it led: [start, end), in epoch seconds.

        The times are the sidecar's own (`observed_at`: when it published the state, before
        writing it to every stream), all on this machine's one wall clock; arrival times in
        this process's reader threads would measure thread scheduling under load instead.
        """
        intervals, start = [], None
        with self._changed:
            events = [
                (told, snapshot) for told, (_, snapshot) in zip(self.told, self.events, strict=True)
            ]
        for told, snapshot in events:
            if snapshot.get("is_leader") and start is None:
                start = told
            elif not snapshot.get("is_leader") and start is not None:
                intervals.append((start, told))
                start = None
        if start is not None:
            intervals.append((start, float("inf")))
        return intervals


def _published(snapshot: Snapshot) -> float:
    stamp = str(snapshot["observed_at"])
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def start_all(sidecars: Iterable[Sidecar]) -> list[Sidecar]:
    return [s.wait_started() for s in sidecars]


def wait_one_leader(group: list[Sidecar], timeout: float = 30) -> Sidecar:
    """Wait until exactly one live replica leads and every live replica names it."""
    deadline = time.monotonic() + timeout
    while True:
        live = [s for s in group if s.proc.poll() is None]
        states = [s.latest for s in live]
        leaders = [s for s, st in zip(live, states, strict=True) if st.get("is_leader")]
        if len(leaders) == 1 and all(st.get("name") == leaders[0].name for st in states):
            return leaders[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no single leader: {[(s.name, s.latest) for s in live]}")
        # Wake on the next streamed change of any replica.
        with live[0]._changed:
            live[0]._changed.wait(0.05)


def assert_never_two_leaders_per_election(made: list[Sidecar]) -> None:
    """The checker over each election's replicas (those that named one with --election)."""
    by_election: dict[str, list[Sidecar]] = {}
    for sidecar in made:
        if "--election" in sidecar.args:
            election = sidecar.args[sidecar.args.index("--election") + 1]
            by_election.setdefault(election, []).append(sidecar)
    for group in by_election.values():
        assert_never_two_leaders(group)


def assert_never_two_leaders(group: list[Sidecar]) -> None:
    """The no-double-leader check over what every replica told its app."""
    intervals = sorted((start, end, s.name) for s in group for start, end in s.leader_intervals())
    held_until, holder = float("-inf"), ""
    for start, end, name in intervals:
        assert start >= held_until, (
            f"{holder} led until {held_until:.3f} and {name} from {start:.3f}"
        )
        if end > held_until:
            held_until, holder = end, name
