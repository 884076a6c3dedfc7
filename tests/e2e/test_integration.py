"""App integration, end to end: Pod labels on the real API server, health gating, notify."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.sidecars import (
    RETRY,
    Sidecar,
    start_all,
    wait_one_leader,
)
from tests.kube.cluster import Cluster

ROLE = "leader-sidecar.io/role"


class Server:
    """A small HTTP server in a thread, standing in for the app next to the sidecar."""

    def __init__(self, handle: Callable[[BaseHTTPRequestHandler], None]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                handle(self)

            def do_POST(self) -> None:
                handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


# ------------------------------------------------------------------ Pod labels (real API)


def _pods(cluster: Cluster, namespace: str, names: list[str]) -> None:
    for name in names:
        status, body = cluster.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/pods",
            {
                "metadata": {"name": name, "labels": {"app": "shop"}},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
            },
        )
        assert status == 201, body


def _roles(cluster: Cluster, namespace: str) -> dict[str, str]:
    status, body = cluster.api("GET", f"/api/v1/namespaces/{namespace}/pods")
    assert status == 200, body
    return {
        p["metadata"]["name"]: p["metadata"].get("labels", {}).get(ROLE, "") for p in body["items"]
    }


class LabelPoller:
    """Reads every Pod's role label every 20 ms, as a Service's endpoints would see them."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.samples: list[tuple[float, dict[str, str]]] = []
        self._sampled = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(cluster, namespace), daemon=True)
        self._thread.start()

    def _run(self, cluster: Cluster, namespace: str) -> None:
        while not self._stop.wait(0.02):
            sample = (time.monotonic(), _roles(cluster, namespace))
            with self._sampled:
                self.samples.append(sample)
                self._sampled.notify_all()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def first(self, predicate: Callable[[dict[str, str]], bool], after: float) -> float:
        """The first sample after `after` satisfying `predicate` (waiting up to 5 s for it)."""

        def found() -> float | None:
            return next((m for m, r in self.samples if m >= after and predicate(r)), None)

        with self._sampled:
            self._sampled.wait_for(lambda: found() is not None, timeout=5)
            moment = found()
        if moment is None:
            raise AssertionError(f"never seen; last {self.samples[-1] if self.samples else None}")
        return moment


def has_leader_label(pod: str) -> Callable[[dict[str, str]], bool]:
    return lambda roles: roles.get(pod) == "leader"


def test_the_role_label_follows_leadership_and_is_never_on_two_pods(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    names = ["shop-a", "shop-b", "shop-c"]
    _pods(kube_cluster, namespace, names)
    # A crashed predecessor left a stale `leader` label behind.
    kube_cluster.api(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/pods/shop-c",
        {"metadata": {"labels": {ROLE: "leader", "leader-sidecar.io/election": "shop"}}},
    )
    args = ["--kubeconfig", str(kube_cluster.kubeconfig), "--election", "shop", "--label-pod"]
    env = {"POD_NAMESPACE": namespace}
    group = start_all(sidecars(n, args, {**env, "POD_NAME": n}) for n in names[:2])
    leader = wait_one_leader(group)
    roles = _roles(kube_cluster, namespace)
    assert roles[leader.name] == "leader"
    assert roles["shop-c"] == "follower"  # demoted when the new leader took over
    assert list(roles.values()).count("leader") == 1
    group += start_all([sidecars("shop-c", args, {**env, "POD_NAME": "shop-c"})])
    wait_one_leader(group)

    poller = LabelPoller(kube_cluster, namespace)
    moves = []
    try:
        for _ in range(3):
            current = wait_one_leader([s for s in group if s.proc.poll() is None])
            sent = time.monotonic()
            current.terminate()
            assert current.wait_exit() == 0
            live = [s for s in group if s.proc.poll() is None]
            new = wait_one_leader(live)
            new.wait_for(lambda s: bool(s.get("is_leader")))
            labelled = poller.first(has_leader_label(new.name), after=sent)
            moves.append(labelled - sent)
            # The label was set before the app heard it leads: the sidecar logs both in order.
            events = [
                (e.get("event"), e.get("role"))
                for e in new.logs
                if e.get("event") in ("pod labelled", "acquired")
            ]
            assert events[-2:] == [("pod labelled", "leader"), ("acquired", None)], events
            # Restart the stopped replica, as its Deployment would.
            group.append(sidecars(current.name, args, {**env, "POD_NAME": current.name}))
            group[-1].wait_started()
            group = [s for s in group if s.proc.poll() is None]
    finally:
        poller.stop()
    for moment, roles in poller.samples:
        assert list(roles.values()).count("leader") <= 1, (moment, roles)
    print(
        f"label moves after SIGTERM: {[round(m, 3) for m in moves]}, "
        f"median {statistics.median(moves):.3f}s"
    )


# --------------------------------------------------------- health gating (local backend)


@pytest.fixture
def app_health() -> Iterator[tuple[Server, dict[str, int]]]:
    statuses: dict[str, int] = {}

    def handle(handler: BaseHTTPRequestHandler) -> None:
        reply(handler, statuses.get(handler.path.rsplit("/", 1)[-1], 503))

    server = Server(handle)
    yield server, statuses
    server.close()


def test_a_sick_app_never_leads_and_a_leader_whose_app_fails_hands_over(
    app_health: tuple[Server, dict[str, int]], sidecars: Callable[..., Sidecar], tmp_path: Path
) -> None:
    server, statuses = app_health
    statuses.update({"a": 503, "b": 200})
    period, threshold = 0.2, 3

    def start(name: str) -> Sidecar:
        return sidecars(
            name,
            [
                "--backend",
                "local",
                "--local-dir",
                str(tmp_path),
                "--election",
                "shop",
                "--app-health-url",
                f"{server.url}/health/{name}",
                "--app-health-period",
                f"{period}s",
                "--app-health-failure-threshold",
                str(threshold),
            ],
        )

    a = start("a").wait_started()  # first, and alone: it still must not lead
    a.wait_for(lambda s: s.get("app_health") == "unknown")
    b = start("b").wait_started()
    assert wait_one_leader([a, b]) is b
    # Never a 2xx yet: "unknown", then "unhealthy" once the failures reach the threshold.
    assert a.leader()["app_health"] in ("unknown", "unhealthy")
    _, health = a.request("GET", "/healthz")
    assert health["app_health"] in ("unknown", "unhealthy")
    # a's app recovers: it joins the race as a follower.
    statuses["a"] = 200
    a.wait_for(lambda s: s.get("app_health") == "healthy")
    assert b.leader()["is_leader"]
    # The leader's app fails: b resigns after the threshold, a takes over.
    failed = time.monotonic()
    statuses["b"] = 500
    took = a.wait_for(lambda s: bool(s.get("is_leader"))) - failed
    assert took <= threshold * period + RETRY + 0.5, f"health-gated handover took {took:.3f}s"
    assert b.leader()["app_health"] == "unhealthy"
    print(f"health-gated handover: {took:.3f}s (threshold x period = {threshold * period}s)")


# -------------------------------------------------------------- notify (local backend)


def test_notify_posts_every_change_in_order_and_the_last_state_survives_failures(
    sidecars: Callable[..., Sidecar], tmp_path: Path
) -> None:
    received: list[tuple[str, dict[str, Any]]] = []
    failures = {"b": 2}  # b's receiver answers 500 twice, then 200
    lock = threading.Lock()

    def handle(handler: BaseHTTPRequestHandler) -> None:
        name = handler.path.rsplit("/", 1)[-1]
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with lock:
            if failures.get(name, 0) > 0:
                failures[name] -= 1
                reply(handler, 500)
                return
            received.append((name, body))
        reply(handler, 204)

    server = Server(handle)
    try:

        def start(name: str) -> Sidecar:
            return sidecars(
                name,
                [
                    "--backend",
                    "local",
                    "--local-dir",
                    str(tmp_path),
                    "--election",
                    "shop",
                    "--notify-url",
                    f"{server.url}/notify/{name}",
                ],
            ).wait_started()

        a = start("a")
        a.wait_for(lambda s: bool(s.get("is_leader")))
        b = start("b")
        b.wait_for(lambda s: s.get("name") == "a")
        a.terminate()
        assert a.wait_exit() == 0
        b.wait_for(lambda s: bool(s.get("is_leader")))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                got_b = [body for name, body in received if name == "b"]
            if got_b and got_b[-1]["is_leader"]:
                break
            b.wait_for(lambda s: True, timeout=0.1)
    finally:
        server.close()
    got_a = [body for name, body in received if name == "a"]
    got_b = [body for name, body in received if name == "b"]
    # a: every state it went through, in order, ending with "not leader" after its release.
    assert [s["is_leader"] for s in got_a][-2:] == [True, False], got_a
    assert got_a.index(next(s for s in got_a if s["is_leader"])) > 0  # starting states first
    # b: despite two 500s, the newest state arrived last: it leads.
    assert got_b[-1]["is_leader"] is True and got_b[-1]["name"] == "b"
    assert [s["name"] for s in got_b].count("b") >= 1
