"""What the app-facing API promises, checked from outside on real `leader-sidecar run` processes.

- Streams (SSE and gRPC Watch) carry a live `valid_until`: every LEADER message is still valid
  when it arrives, and when renewals stop, "not leader" arrives at `valid_until`.
- The app hears "not leader" (gRPC, SSE, --notify-url) before the next leader says "leader".
- Resign says what happened; the API refuses foreign Hosts, cross-origin writes, missing tokens,
  and streams past the cap; SIGTERM works during start-up; --shutdown-timeout is a total.

Clients record arrivals with this machine's wall clock, the clock the sidecars' RFC 3339 times
are written with, so arrivals compare directly with `valid_until`.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb
from sidecar.api._pb.leadersidecar.v1 import leader_pb2_grpc as pb_grpc
from tests.e2e.relay import Relay
from tests.e2e.sidecars import RENEW, RETRY, Sidecar, wait_one_leader
from tests.kube.cluster import Cluster

Make = Callable[..., Sidecar]


def wall(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def grpc_address(sidecar: Sidecar) -> str:
    started = next(e for e in sidecar.logs if e.get("event") == "started")
    return str(started["grpc"])


class _Stream:
    """Arrivals (wall time, message) of one stream, read in a thread."""

    def __init__(self) -> None:
        self.items: list[tuple[float, Any]] = []
        self.error: Any = None
        self._changed = threading.Condition()

    def _add(self, item: Any) -> None:
        with self._changed:
            self.items.append((time.time(), item))
            self._changed.notify_all()

    def _end(self, error: Any) -> None:
        with self._changed:
            self.error = error
            self._changed.notify_all()

    def snapshot(self) -> list[tuple[float, Any]]:
        with self._changed:
            return list(self.items)

    def wait_for(
        self, predicate: Callable[[Any], bool], timeout: float = 20, since: float | None = None
    ) -> float:
        """Arrival of the first message matching `predicate`: among those arriving from now
        on, or from `since` (wall time) if given."""
        start = len(self.snapshot()) if since is None else 0
        after = float("-inf") if since is None else since

        def hit() -> float | None:
            return next((t for t, m in self.items[start:] if t >= after and predicate(m)), None)

        with self._changed:
            self._changed.wait_for(lambda: hit() is not None or self.error is not None, timeout)
            found = hit()
        assert found is not None, f"no matching message; last {self.items[-3:]} ({self.error})"
        return found


class GrpcWatch(_Stream):
    def __init__(self, address: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__()
        self._channel = grpc.insecure_channel(address)
        stub: Any = pb_grpc.LeaderElectionStub(self._channel)  # type: ignore[no-untyped-call]
        self._call = stub.Watch(pb.WatchRequest(), metadata=metadata, timeout=120)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for message in self._call:
                self._add(message)
        except grpc.RpcError as exc:
            self._end(exc.code())

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


class SseWatch(_Stream):
    def __init__(self, port: int, path: str = "/leader?watch=true") -> None:
        super().__init__()
        self.status = 0
        self._connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self._connection.request("GET", path)
        self._response = self._connection.getresponse()
        self.status = self._response.status
        if self.status == 200:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for raw in self._response:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    self._add(json.loads(line[6:]))
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as exc:
            self._end(exc)  # AttributeError: closed under the reader by close()
        self._end("closed")

    def close(self) -> None:
        self._connection.close()


def leader_grpc(message: Any) -> bool:
    return bool(message.is_leader)


def local_args(tmp_path: Path, election: str = "promises") -> list[str]:
    return ["--backend", "local", "--local-dir", str(tmp_path), "--election", election]


def kube_args(kubeconfig: Path, namespace: str, election: str = "promises") -> list[str]:
    return ["--kubeconfig", str(kubeconfig), "--namespace", namespace, "--election", election]


@pytest.fixture
def relay(kube_cluster: Cluster) -> Iterator[Relay]:
    link = Relay(kube_cluster.port)
    yield link
    link.close()


# ------------------------------------------------------------------ live valid_until


def test_streams_carry_a_live_valid_until_for_three_renew_deadlines(
    sidecars: Make, tmp_path: Path
) -> None:
    leader = sidecars("live", local_args(tmp_path)).wait_started()
    leader.wait_for(lambda s: bool(s.get("is_leader")))
    rpc = GrpcWatch(grpc_address(leader))
    sse = SseWatch(leader.port)
    time.sleep(3 * RENEW)
    rpc.close()
    sse.close()
    checks: list[tuple[str, list[tuple[float, Any]], Callable[[Any], float], Callable[[Any], int]]]
    checks = [
        (
            "gRPC",
            rpc.snapshot(),
            lambda m: m.valid_until.ToNanoseconds() / 1e9,
            lambda m: m.valid_for_ms,
        ),
        ("SSE", sse.snapshot(), lambda m: wall(m["valid_until"]), lambda m: m["valid_for_ms"]),
    ]
    for name, items, until, valid_for in checks:
        leading = [(t, m) for t, m in items if (m.is_leader if name == "gRPC" else m["is_leader"])]
        assert len(leading) == len(items), f"{name}: the leader said it did not lead"
        # One message per renewal (coalesced to one per retry period), none stale on arrival.
        assert len(leading) >= 3 * RENEW / RETRY * 0.7, f"{name}: only {len(leading)} messages"
        for arrived, message in leading:
            assert until(message) > arrived, f"{name}: valid_until already past on arrival"
            assert 0 < valid_for(message) <= RENEW * 1000
        gaps = [b - a for (a, _), (b, _) in itertools.pairwise(leading)]
        assert max(gaps) < RETRY * 2, f"{name}: a fresh valid_until came {max(gaps):.3f}s late"
        assert min(gaps) > RETRY * 0.5, f"{name}: more than one message per retry period"


def test_a_leader_whose_renewals_are_blocked_says_not_leader_at_valid_until(
    sidecars: Make, kube_cluster: Cluster, namespace: str, relay: Relay, tmp_path: Path
) -> None:
    kubeconfig = relay.kubeconfig(kube_cluster.kubeconfig, tmp_path / "kubeconfig")
    leader = sidecars("blocked", kube_args(kubeconfig, namespace)).wait_started()
    leader.wait_for(lambda s: bool(s.get("is_leader")))
    rpc = GrpcWatch(grpc_address(leader))
    sse = SseWatch(leader.port)
    rpc.wait_for(leader_grpc, since=0.0)
    sse.wait_for(lambda m: m["is_leader"], since=0.0)
    time.sleep(RETRY * 2)
    frozen = time.time()
    relay.freeze()
    lost_rpc = rpc.wait_for(lambda m: not m.is_leader, timeout=RENEW + 5, since=frozen)
    lost_sse = sse.wait_for(lambda m: not m["is_leader"], timeout=5, since=frozen)
    last_rpc = [m for _, m in rpc.snapshot() if m.is_leader][-1]
    last_sse = [m for _, m in sse.snapshot() if m["is_leader"]][-1]
    deadline = last_rpc.valid_until.ToNanoseconds() / 1e9
    assert abs(wall(last_sse["valid_until"]) - deadline) < 0.001
    # "Not leader" at valid_until: never before it, and within 20 ms after it.
    for lost in (lost_rpc, lost_sse):
        assert deadline - 0.002 <= lost <= deadline + 0.020, f"{lost - deadline:+.4f}s"
    relay.thaw()
    rpc.close()
    sse.close()


# ------------------------------------------------------------ the app hears first


class Receiver:
    """The app's end of --notify-url: every POST with its wall-clock arrival."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    receiver.posts.append((time.time(), self.path.rsplit("/", 1)[1], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/notify"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def first(self, name: str, predicate: Callable[[dict[str, Any]], bool], after: float) -> float:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self._lock:
                hit = next(
                    (t for t, who, b in self.posts if who == name and t > after and predicate(b)),
                    None,
                )
            if hit is not None:
                return hit
            time.sleep(0.005)
        raise AssertionError(f"no matching POST from {name}")

    def close(self) -> None:
        self._server.shutdown()


def test_the_old_leaders_app_hears_not_leader_before_the_new_leader_leads(
    sidecars: Make, kube_cluster: Cluster, namespace: str
) -> None:
    receiver = Receiver()
    incarnation = iter(range(1000))

    def start(base: str) -> tuple[Sidecar, GrpcWatch]:
        name = f"{base}-{next(incarnation)}"
        args = [*kube_args(kube_cluster.kubeconfig, namespace), "--notify-url"]
        sidecar = sidecars(name, [*args, f"{receiver.url}/{name}"]).wait_started()
        return sidecar, GrpcWatch(grpc_address(sidecar))

    live = dict(start(base) for base in "abc")
    try:
        for handover in range(20):
            old = wait_one_leader(list(live))
            old_watch = live[old]
            old_watch.wait_for(leader_grpc, since=0.0)
            began = time.time()
            if handover % 2:
                status, body = old.request("POST", "/leader/resign")
                assert status == 200 and body["released"], body
            else:
                old.terminate()
            others = [s for s in live if s is not old]
            new_at = _first_leader_arrival(live, others, began)
            told_rpc = next(t for t, m in old_watch.snapshot() if t > began and not m.is_leader)
            told_post = receiver.first(old.name, lambda b: not b["is_leader"], began)
            assert told_rpc < new_at, f"handover {handover}: gRPC heard it late"
            assert told_post < new_at, f"handover {handover}: the notify POST came late"
            if not handover % 2:
                assert old.wait_exit() == 0
                old_watch.close()
                del live[old]
                sidecar, watch = start(old.name.split("-")[0])
                live[sidecar] = watch
    finally:
        for watch in live.values():
            watch.close()
        receiver.close()


def _first_leader_arrival(
    live: dict[Sidecar, GrpcWatch], others: list[Sidecar], began: float
) -> float:
    deadline = time.monotonic() + RENEW + 10
    while time.monotonic() < deadline:
        arrivals = [t for s in others for t, m in live[s].snapshot() if t > began and m.is_leader]
        if arrivals:
            return min(arrivals)
        time.sleep(0.005)
    raise AssertionError("no new leader")


# ------------------------------------------------------------------------- resign


def test_resign_answers_503_with_the_reason_when_the_release_cannot_be_written(
    sidecars: Make, kube_cluster: Cluster, namespace: str, relay: Relay, tmp_path: Path
) -> None:
    kubeconfig = relay.kubeconfig(kube_cluster.kubeconfig, tmp_path / "kubeconfig")
    leader = sidecars("stuck", kube_args(kubeconfig, namespace)).wait_started()
    leader.wait_for(lambda s: bool(s.get("is_leader")))
    relay.freeze()
    status, body = leader.request("POST", "/leader/resign")
    assert status == 503, body
    assert body["resigned"] is True and body["released"] is False and body["error"]
    assert leader.leader()["is_leader"] is False  # it stepped down all the same
    relay.thaw()


# ----------------------------------------------------------------------- security


def test_foreign_host_and_cross_origin_resign_are_403(sidecars: Make, tmp_path: Path) -> None:
    one = sidecars("guarded", local_args(tmp_path)).wait_started()
    one.wait_for(lambda s: bool(s.get("is_leader")))
    status, body = one.request("GET", "/leader", {"Host": "attacker.example:4040"})
    assert status == 403 and "Host" in body["error"]
    status, _ = one.request("GET", "/leader", {"Host": f"localhost:{one.port}"})
    assert status == 200
    status, body = one.request("POST", "/leader/resign", {"Origin": "http://attacker.example"})
    assert status == 403 and "cross-origin" in body["error"]
    status, body = one.request("POST", "/leader/resign", {"Origin": "null"})
    assert status == 403
    assert one.leader()["is_leader"] is True  # nothing happened
    status, _ = one.request("POST", "/leader/resign", {"Origin": f"http://localhost:{one.port}"})
    assert status == 200


def test_with_a_token_resign_and_reads_need_it_on_http_and_grpc(
    sidecars: Make, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    args = [*local_args(tmp_path), "--api-token-file", str(token), "--api-token-reads"]
    one = sidecars("tokened", args).wait_started(timeout=20)
    good = {"Authorization": "Bearer s3cret-token"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic xyz"}):
        assert one.request("GET", "/leader", headers)[0] == 401
        assert one.request("POST", "/leader/resign", headers)[0] == 401
    assert one.request("GET", "/healthz")[0] == 200  # probes never need it
    assert one.request("GET", "/leader", good)[0] == 200

    channel = grpc.insecure_channel(grpc_address(one))
    stub: Any = pb_grpc.LeaderElectionStub(channel)  # type: ignore[no-untyped-call]
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetLeader(pb.GetLeaderRequest(), metadata=metadata, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            stub.Resign(pb.ResignRequest(), metadata=metadata, timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    authorised = (("authorization", "Bearer s3cret-token"),)
    assert stub.GetLeader(pb.GetLeaderRequest(), metadata=authorised, timeout=5).identity
    channel.close()
    # A rotated Secret: the new token works, the old one no longer does.
    token.write_text("rotated-token\n")
    time.sleep(1.2)
    assert one.request("GET", "/leader", good)[0] == 401
    assert one.request("GET", "/leader", {"Authorization": "Bearer rotated-token"})[0] == 200


# -------------------------------------------------------------------- stream cap


def test_streams_past_the_cap_get_503_and_resource_exhausted(
    sidecars: Make, tmp_path: Path
) -> None:
    one = sidecars("capped", [*local_args(tmp_path), "--max-streams", "3"]).wait_started()
    one.wait_for(lambda s: bool(s.get("is_leader")))  # the harness's own SSE stream is one
    held_sse, held_rpc = SseWatch(one.port), GrpcWatch(grpc_address(one))
    held_rpc.wait_for(lambda m: True, since=0.0)
    refused = SseWatch(one.port)
    assert refused.status == 503
    refused_rpc = GrpcWatch(grpc_address(one))
    deadline = time.monotonic() + 10
    while refused_rpc.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert refused_rpc.error == grpc.StatusCode.RESOURCE_EXHAUSTED
    held_rpc.close()
    time.sleep(0.2)
    again = GrpcWatch(grpc_address(one))
    again.wait_for(lambda m: True, since=0.0)  # a slot was freed
    again.close()
    held_sse.close()


# ------------------------------------------------------------ start-up and shutdown


def test_sigterm_during_workload_discovery_exits_cleanly(
    kube_cluster: Cluster, namespace: str, relay: Relay, tmp_path: Path
) -> None:
    kubeconfig = relay.kubeconfig(kube_cluster.kubeconfig, tmp_path / "kubeconfig")
    relay.freeze()  # discovery's GET of the pod hangs
    args = ["--kubeconfig", str(kubeconfig), "--namespace", namespace]
    sidecar = Sidecar("discovering", args, env={"POD_NAME": "web-0"})
    try:
        deadline = time.monotonic() + 30
        while relay.connections == 0:  # discovery has connected, and hangs
            assert time.monotonic() < deadline and sidecar.proc.poll() is None
            time.sleep(0.02)
        time.sleep(0.3)
        sent = time.monotonic()
        sidecar.terminate()
        assert sidecar.wait_exit(timeout=5) == 0
        assert time.monotonic() - sent < 1.0
        assert "stopped during start-up" in sidecar.log_events()
    finally:
        relay.thaw()
        sidecar.stop()


def test_shutdown_timeout_bounds_the_whole_shutdown_when_the_release_hangs(
    sidecars: Make, kube_cluster: Cluster, namespace: str, relay: Relay, tmp_path: Path
) -> None:
    kubeconfig = relay.kubeconfig(kube_cluster.kubeconfig, tmp_path / "kubeconfig")
    args = [*kube_args(kubeconfig, namespace), "--shutdown-timeout", "1s"]
    leader = sidecars("slow-exit", args).wait_started()
    leader.wait_for(lambda s: bool(s.get("is_leader")))
    rpc = GrpcWatch(grpc_address(leader))
    rpc.wait_for(leader_grpc, since=0.0)
    relay.freeze()
    sent = time.monotonic()
    leader.proc.send_signal(signal.SIGTERM)
    assert leader.wait_exit(timeout=10) == 0
    took = time.monotonic() - sent
    assert took < 1.3, f"shutdown took {took:.2f}s with --shutdown-timeout 1s"
    assert any(not m.is_leader for _, m in rpc.snapshot())  # the app heard it first
    relay.thaw()
