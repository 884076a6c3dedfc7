"""The gRPC API of real `leader-sidecar run` processes, observed the way apps would.

Watch through a real handover (local file backend and the real kube-apiserver), 1,000 streams on
one sidecar, health when the backend fails, and the example clients in Python, Go and Node.js.
Clients record what arrives, with its arrival time, in threads: tests wait on arrivals.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb
from sidecar.api._pb.leadersidecar.v1 import leader_pb2_grpc as pb_grpc
from sidecar.api.grpc import LEADER_SERVICE, SERVICE
from tests.e2e.sidecars import REPO, Sidecar

LEASE, RENEW, RETRY = 3, 2, 0.4  # short timings, client-go's ratios
TIMINGS = [
    "--lease-duration",
    f"{LEASE}s",
    "--renew-deadline",
    f"{RENEW}s",
    "--retry-period",
    f"{RETRY}s",
]
LEADER, FOLLOWER = pb.Leadership.STATE_LEADER, pb.Leadership.STATE_FOLLOWER
NO_LEADER, UNKNOWN = pb.Leadership.STATE_NO_LEADER, pb.Leadership.STATE_UNKNOWN
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ------------------------------------------------------------------------------- clients

T = TypeVar("T")


def grpc_address(sidecar: Sidecar) -> str:
    """The address the sidecar bound (it is started with --grpc-address 127.0.0.1:0)."""
    started = next(e for e in sidecar.logs if e.get("event") == "started")
    return str(started["grpc"])


class _Recorder(Generic[T]):
    def __init__(self, name: str) -> None:
        self.name = name
        self.items: list[tuple[float, T]] = []
        self.status: grpc.StatusCode | None = None  # how the stream ended
        self._changed = threading.Condition()

    def _add(self, item: T) -> None:
        with self._changed:
            self.items.append((time.monotonic(), item))
            self._changed.notify_all()

    def _end(self, status: grpc.StatusCode) -> None:
        with self._changed:
            self.status = status
            self._changed.notify_all()

    @property
    def values(self) -> list[T]:
        with self._changed:
            return [item for _, item in self.items]

    def wait_for(self, predicate: Callable[[T], bool], timeout: float = 20) -> tuple[float, T]:
        """The first arrival (from the start) that satisfies `predicate`."""

        def found() -> tuple[float, T] | None:
            return next(((t, v) for t, v in self.items if predicate(v)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self.status, timeout)
            hit = found()
        if hit is None:
            raise AssertionError(f"{self.name}: nothing matching in {self.values} ({self.status})")
        return hit

    def wait_end(self, timeout: float = 20) -> grpc.StatusCode:
        with self._changed:
            self._changed.wait_for(lambda: self.status is not None, timeout)
        assert self.status is not None, f"{self.name}: the stream did not end"
        return self.status


class Watch(_Recorder[pb.Leadership]):
    """One LeaderElection.Watch stream."""

    def __init__(self, address: str, name: str = "watch") -> None:
        super().__init__(name)
        self._channel = grpc.insecure_channel(address)
        stub: Any = pb_grpc.LeaderElectionStub(self._channel)  # type: ignore[no-untyped-call]
        self.stub = stub
        self._call = stub.Watch(pb.WatchRequest(), wait_for_ready=True, timeout=120)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for message in self._call:
                self._add(message)
        except grpc.RpcError as exc:
            self._end(exc.code())
        else:
            self._end(grpc.StatusCode.OK)

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


class HealthWatch(_Recorder[int]):
    """One grpc.health.v1.Health.Watch stream for `service`."""

    def __init__(self, address: str, service: str) -> None:
        super().__init__(f"health {service!r}")
        self._channel = grpc.insecure_channel(address)
        stub: Any = health_pb2_grpc.HealthStub(self._channel)
        self._call = stub.Watch(
            health_pb2.HealthCheckRequest(service=service), wait_for_ready=True, timeout=120
        )
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for response in self._call:
                self._add(int(response.status))
        except grpc.RpcError as exc:
            self._end(exc.code())
        else:
            self._end(grpc.StatusCode.OK)

    def latest_is(self, status: int, timeout: float = 20) -> float:
        """Wait until the newest status is `status`; when it arrived."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: bool(self.items) and self.items[-1][1] == status, timeout
            )
            if not ok:
                raise AssertionError(f"{self.name}: latest of {self.values} is not {status}")
            return self.items[-1][0]

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


class Swarm:
    """Many Watch streams (grpc.aio in a thread of its own), as many apps would hold."""

    PER_CHANNEL = 100

    def __init__(self, address: str, count: int) -> None:
        self.count = count
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._latest: list[tuple[float, pb.Leadership] | None] = [None] * count
        self._changed = threading.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[grpc.aio.Channel] = []
        self._run(self._open(address))

    def _run(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _open(self, address: str) -> None:
        self._channels = [
            grpc.aio.insecure_channel(address) for _ in range(-(-self.count // self.PER_CHANNEL))
        ]
        for index in range(self.count):
            channel = self._channels[index // self.PER_CHANNEL]
            self._tasks.append(asyncio.create_task(self._follow(channel, index)))

    async def _follow(self, channel: grpc.aio.Channel, index: int) -> None:
        stub: Any = pb_grpc.LeaderElectionStub(channel)  # type: ignore[no-untyped-call]
        async for message in stub.Watch(pb.WatchRequest(), wait_for_ready=True):
            arrived = time.monotonic()
            with self._changed:
                self._latest[index] = (arrived, message)
                self._changed.notify_all()

    def wait_all(self, predicate: Callable[[pb.Leadership], bool], timeout: float = 60) -> float:
        """Wait until every stream's newest message satisfies `predicate`; the last arrival."""

        def done() -> bool:
            return all(item is not None and predicate(item[1]) for item in self._latest)

        with self._changed:
            if not self._changed.wait_for(done, timeout):
                behind = sum(1 for i in self._latest if i is None or not predicate(i[1]))
                raise AssertionError(f"{behind} of {self.count} streams did not get there")
            return max(item[0] for item in self._latest if item is not None)

    def close(self) -> None:
        async def stop() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for channel in self._channels:
                await channel.close()

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


# ------------------------------------------------------------------------------ fixtures


class Backend:
    def __init__(self, kind: str, args: list[str], cluster: Any = None) -> None:
        self.kind, self.args, self.cluster = kind, args, cluster


@pytest.fixture(params=["local", "kubernetes"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return Backend("local", ["--backend", "local", "--local-dir", str(tmp_path)])
    cluster = request.getfixturevalue("kube_cluster")
    namespace: str = request.getfixturevalue("namespace")
    args = ["--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace]
    return Backend("kubernetes", args, cluster)


@pytest.fixture
def local(tmp_path: Path) -> Backend:
    return Backend("local", ["--backend", "local", "--local-dir", str(tmp_path)])


Start = Callable[..., Sidecar]


def _starter(backend: Backend) -> Iterator[Start]:
    made: list[Sidecar] = []

    def start(name: str, election: str = "grpc-demo") -> Sidecar:
        sidecar = Sidecar(name, [*backend.args, "--election", election, *TIMINGS])
        made.append(sidecar)
        return sidecar.wait_started()

    yield start
    for sidecar in made:
        sidecar.stop()
    for sidecar in made:
        crashes = [e for e in sidecar.logs if e.get("level") in ("error", "critical", "raw")]
        assert not crashes, f"{sidecar.name} logged errors: {crashes}"


@pytest.fixture
def start(backend: Backend) -> Iterator[Start]:
    yield from _starter(backend)


@pytest.fixture
def start_local(local: Backend) -> Iterator[Start]:
    yield from _starter(local)


def leader_and_follower(start: Start) -> tuple[Sidecar, Sidecar]:
    """`a` leads (it started alone), `b` follows it."""
    a = start("a")
    a.wait_for(lambda s: bool(s.get("is_leader")))
    b = start("b")
    b.wait_for(lambda s: s.get("name") == "a")
    return a, b


def facts(m: pb.Leadership) -> tuple[Any, ...]:
    token = m.fencing_token if m.HasField("fencing_token") else None
    return (m.state, m.leader, token, m.error, m.ready, m.app_health)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------------- tests


def test_watch_sends_the_current_state_then_every_transition_of_a_handover(
    start: Start,
) -> None:
    a, b = leader_and_follower(start)
    on_a, on_b = Watch(grpc_address(a), "on a"), Watch(grpc_address(b), "on b")
    try:
        first_a = on_a.wait_for(lambda m: True)[1]
        first_b = on_b.wait_for(lambda m: True)[1]
        assert (first_a.state, first_a.leader, first_a.is_leader) == (LEADER, "a", True)
        assert first_a.HasField("valid_until") and first_a.ready
        assert (first_b.state, first_b.leader, first_b.is_leader) == (FOLLOWER, "a", False)
        token = first_b.fencing_token
        assert first_a.fencing_token == token == first_b.lease.transitions

        a.terminate()
        b_leads, lead = on_b.wait_for(lambda m: m.is_leader)
        assert (lead.state, lead.leader, lead.identity) == (LEADER, "b", "b")
        assert lead.fencing_token == token + 1
        # a told its app "not leader" before b told its app it leads, then its stream ended
        # with UNAVAILABLE (clients reconnect) as the process exited.
        a_stopped, stopped = on_a.wait_for(lambda m: not m.is_leader)
        assert stopped.state in (NO_LEADER, UNKNOWN, FOLLOWER)
        assert a_stopped <= b_leads
        assert on_a.wait_end() == grpc.StatusCode.UNAVAILABLE
        assert a.wait_exit() == 0

        seen = on_b.values[: on_b.values.index(lead) + 1]
        for before, after in itertools.pairwise(seen):
            assert after.revision > before.revision
            assert facts(after) != facts(before), "a message that changed nothing"
        # FOLLOWER(a), then the released Lease (unless b's stream skipped it), then LEADER(b).
        path = [(m.state, m.leader) for m in seen]
        assert path[0] == (FOLLOWER, "a") and path[-1] == (LEADER, "b")
        assert set(path[1:-1]) <= {(NO_LEADER, "")}, path
        # Latest-value fan-out may skip an intermediate state (the released Lease, when b wins
        # within one turn of its loop), never the newest, and never out of order (checked above).
    finally:
        on_a.close()
        on_b.close()


def test_a_thousand_streams_all_get_the_handover_and_renewals_stay_on_time(
    start_local: Start,
) -> None:
    a, b = leader_and_follower(start_local)
    rss_before = rss_kib(b.proc.pid)
    connecting = time.monotonic()
    swarm = Swarm(grpc_address(b), 1000)  # all at once
    try:
        swarm.wait_all(lambda m: m.leader == "a")
        connected = time.monotonic() - connecting
        rss_added = rss_kib(b.proc.pid) - rss_before
        reference = Watch(grpc_address(b), "reference")
        reference.wait_for(lambda m: m.leader == "a")

        a.terminate()
        first, _ = reference.wait_for(lambda m: m.is_leader)
        last = swarm.wait_all(lambda m: m.is_leader and m.leader == "b")
        spread = last - first
        reference.close()

        # Renewals while (and after) the change fans out: the Lease's renewTime every retry
        # period. Sampled from the lease file for a few periods.
        lease_file = Path(next(e for e in b.logs if e.get("event") == "started")["lease"])
        renewals: list[str] = []
        until = time.monotonic() + 6 * RETRY
        while time.monotonic() < until:
            spec = json.loads(lease_file.read_text())["spec"]
            if spec["holderIdentity"] == "b" and spec["renewTime"] not in renewals:
                renewals.append(spec["renewTime"])
            time.sleep(0.02)  # sampling the file, not waiting for an event
        times = [datetime.fromisoformat(r.replace("Z", "+00:00")) for r in renewals]
        gaps = [(t2 - t1).total_seconds() for t1, t2 in itertools.pairwise(times)]
        print(
            f"\n1,000 streams: connected in {connected:.2f}s, RSS +{rss_added / 1024:.1f} MiB "
            f"({rss_added / 1000:.1f} KiB/stream); handover reached the last stream "
            f"{spread * 1000:.1f} ms after the first; renew gaps {[round(g, 3) for g in gaps]}"
        )
        assert len(gaps) >= 3, renewals
        assert max(gaps) < RETRY + 0.25, f"renewals late while fanning out: {gaps}"
        assert "renewed late" not in b.log_events()
        assert spread < 2.0
        assert rss_added < 100 * 1024
    finally:
        swarm.close()


def test_health_goes_not_serving_when_the_backend_fails_and_back(
    start: Start, backend: Backend
) -> None:
    a = start("a")
    a.wait_for(lambda s: bool(s.get("is_leader")))
    address = grpc_address(a)
    overall, election, leader = (HealthWatch(address, s) for s in ("", SERVICE, LEADER_SERVICE))
    lease_file = Path(next(e for e in a.logs if e.get("event") == "started")["lease"])
    try:
        for watch in (overall, election, leader):
            watch.latest_is(SERVING)
        saved = lease_file.read_bytes() if backend.kind == "local" else b""

        if backend.kind == "local":
            broken = lease_file.with_suffix(".broken")
            broken.write_text("this is not a lease record\n")
            broken.replace(lease_file)
        else:
            backend.cluster.stop_apiserver()
        election.latest_is(NOT_SERVING)
        leader.latest_is(NOT_SERVING, timeout=RENEW + 3)  # once the renew deadline passed
        # Readiness stays: an unreachable backend is reported, not "fixed" by a restart.
        assert overall.values[-1] == SERVING

        if backend.kind == "local":
            repaired = lease_file.with_suffix(".repaired")
            repaired.write_bytes(saved)
            repaired.replace(lease_file)
        else:
            backend.cluster.start_apiserver()
        election.latest_is(SERVING, timeout=30)
        leader.latest_is(SERVING, timeout=30)
        assert overall.values == [SERVING]
    finally:
        for watch in (overall, election, leader):
            watch.close()
        if backend.cluster is not None:
            backend.cluster.ensure_running()


# ------------------------------------------------------------------------------- examples

GO_CLIENT = REPO / "examples" / "go" / "bin" / "watch"
NODE_MODULES = REPO / "examples" / "node" / "node_modules"


def _example_commands() -> dict[str, list[str]]:
    missing = []
    if not GO_CLIENT.exists():
        missing.append("go client not built")
    if not NODE_MODULES.exists() or shutil.which("node") is None:
        missing.append("node modules not installed")
    if missing:
        reason = f"{', '.join(missing)}: run scripts/setup_examples.sh"
        if os.environ.get("REQUIRE_EXAMPLES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return {
        "python": [sys.executable, str(REPO / "examples" / "python" / "watch.py")],
        "go": [str(GO_CLIENT)],
        "node": ["node", str(REPO / "examples" / "node" / "watch.js")],
    }


class Example:
    """An example client process; its stdout lines as they come."""

    def __init__(self, name: str, command: list[str], address: str) -> None:
        self.name = name
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEADER_SIDECAR_")}
        env["LEADER_SIDECAR_GRPC"] = address  # as the chart sets it in the app container
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_line(self, prefix: str, timeout: float = 30) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if line.startswith(prefix)), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self.proc.poll(), timeout)
            line = found()
        if line is None:
            self.stop()
            assert self.proc.stderr is not None
            raise AssertionError(
                f"{self.name}: no line {prefix!r} in {self.lines}; stderr {self.proc.stderr.read()}"
            )
        return line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def test_example_clients_print_one_line_per_change_of_a_handover(start_local: Start) -> None:
    commands = _example_commands()
    a, b = leader_and_follower(start_local)
    address = grpc_address(b)
    examples = [Example(name, command, address) for name, command in commands.items()]
    try:
        for example in examples:
            example.wait_line("state=FOLLOWER leader=a is_leader=false")
        token = b.leader()["fencing_token"]
        a.terminate()
        expected = f"state=LEADER leader=b is_leader=true fencing_token={token + 1} "
        for example in examples:
            example.wait_line(expected)
        outputs = {e.name: list(e.lines) for e in examples}
    finally:
        for example in examples:
            example.stop()
    print("\n" + "\n".join(f"{name}:\n  " + "\n  ".join(out) for name, out in outputs.items()))
    # The same lines from all three (each is one change; a slow reader may skip the middle one).
    for name, lines in outputs.items():
        assert lines[0].startswith("state=FOLLOWER leader=a"), (name, lines)
        assert lines[-1].startswith(expected), (name, lines)
        assert len(lines) == len(set(lines)), f"{name} printed a line twice: {lines}"
        middle = [line.split(" revision=")[0] for line in lines[1:-1]]
        assert set(middle) <= {"state=NO_LEADER leader=- is_leader=false fencing_token=-"}, lines


def test_grpc_address_in_use_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "--backend",
                "local",
                "--local-dir",
                str(tmp_path),
                "--id",
                "a",
                "--http-address",
                "127.0.0.1:0",
                "--grpc-address",
                f"127.0.0.1:{port}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("leader-sidecar: error: --grpc-address: cannot listen on ")
