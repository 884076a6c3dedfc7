"""The election as users run it: separate `leader-sidecar run` processes on one Lease.

Every test runs on both backends: the real kube-apiserver from tests/kube, and the local file
backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.sidecars import Sidecar, assert_never_two_leaders, start_all, wait_one_leader
from tests.kube.cluster import Cluster

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


class Backend:
    def __init__(
        self, kind: str, args: list[str], cluster: Cluster | None = None, namespace: str = ""
    ) -> None:
        self.kind, self.args, self.cluster, self.namespace = kind, args, cluster, namespace

    def lease(self, name: str) -> dict[str, Any] | None:
        """The Lease as the API server holds it (kubernetes backend only)."""
        assert self.cluster is not None
        status, body = self.cluster.api(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{name}"
        )
        if status == 404:
            return None
        assert status == 200, body
        return dict(body)


@pytest.fixture(params=["kubernetes", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return Backend("local", ["--backend", "local", "--local-dir", str(tmp_path)])
    cluster: Cluster = request.getfixturevalue("kube_cluster")
    namespace: str = request.getfixturevalue("namespace")
    return Backend(
        "kubernetes",
        ["--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace],
        cluster,
        namespace,
    )


@pytest.fixture
def fleet(backend: Backend) -> Iterator[Callable[..., list[Sidecar]]]:
    made: list[Sidecar] = []
    elections: dict[str, list[Sidecar]] = {}

    def start(
        count: int,
        election: str = "shop",
        extra: list[str] | None = None,
        names: list[str] | None = None,
    ) -> list[Sidecar]:
        names = names or [f"replica-{len(made) + i}" for i in range(count)]
        group = [
            Sidecar(name, [*backend.args, "--election", election, *TIMINGS, *(extra or [])])
            for name in names
        ]
        made.extend(group)
        elections.setdefault(election, []).extend(group)
        return start_all(group)

    yield start
    for sidecar in made:
        sidecar.stop()
    for sidecar in made:
        crashes = [e for e in sidecar.logs if e.get("level") in ("error", "critical", "raw")]
        assert not crashes, f"{sidecar.name} logged errors: {crashes}"
    for members in elections.values():
        assert_never_two_leaders(members)


def test_three_replicas_elect_one_and_agree(fleet: Callable[..., list[Sidecar]]) -> None:
    group = fleet(3)
    leader = wait_one_leader(group)
    answers = [s.leader() for s in group]
    assert [a["is_leader"] for a in answers].count(True) == 1
    assert {a["name"] for a in answers} == {leader.name}
    assert {a["state"] for a in answers} == {"leader", "follower"}
    mine = leader.leader()
    assert mine["fencing_token"] == mine["lease"]["transitions"]
    assert mine["valid_until"] is not None
    assert mine["lease"]["duration_seconds"] == LEASE
    status, _ = leader.request("GET", "/leader/self")
    assert status == 200
    follower = next(s for s in group if s is not leader)
    status, _ = follower.request("GET", "/leader/self")
    assert status == 503


def test_sigterm_hands_over_quickly_and_releases(
    fleet: Callable[..., list[Sidecar]], backend: Backend
) -> None:
    group = fleet(3)
    leader = wait_one_leader(group)
    lease_name = leader.leader()["lease"]["name"]
    token = leader.leader()["fencing_token"]
    sent = time.monotonic()
    leader.terminate()
    others = [s for s in group if s is not leader]
    new = wait_one_leader(others)
    took = new.wait_for(lambda s: bool(s.get("is_leader"))) - sent
    assert leader.wait_exit() == 0
    assert "released" in leader.log_events()
    assert took < RENEW, f"handover took {took:.3f}s: it must not wait for the lease to expire"
    assert new.leader()["fencing_token"] == token + 1
    if backend.kind == "kubernetes":
        lease = backend.lease(lease_name)
        assert lease is not None
        assert lease["spec"]["holderIdentity"] in ("", new.name)
        assert lease["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "leader-sidecar"


def test_sigkill_fails_over_only_after_the_lease_duration(
    fleet: Callable[..., list[Sidecar]],
) -> None:
    group = fleet(3)
    leader = wait_one_leader(group)
    killed = time.monotonic()
    leader.kill()
    others = [s for s in group if s is not leader]
    new = wait_one_leader(others)
    took = new.wait_for(lambda s: bool(s.get("is_leader"))) - killed
    # The dead leader's last renewal was at most one retry period before the kill.
    assert took >= LEASE - RETRY - 0.1, f"took over after {took:.3f}s, before the lease lapsed"
    assert took <= LEASE + 1.0, f"failover took {took:.3f}s"


def test_ten_candidates_at_once_elect_one_without_errors(
    fleet: Callable[..., list[Sidecar]],
) -> None:
    group = fleet(10)
    leader = wait_one_leader(group)
    assert sum(s.leader()["is_leader"] for s in group) == 1
    for sidecar in group:
        assert "backend error" not in sidecar.log_events(), sidecar.log_text()
    assert all(s.leader()["name"] == leader.name for s in group)


def test_resign_moves_leadership_and_answers_409_on_a_follower(
    fleet: Callable[..., list[Sidecar]],
) -> None:
    group = fleet(2)
    leader = wait_one_leader(group)
    follower = next(s for s in group if s is not leader)
    status, body = follower.request("POST", "/leader/resign")
    assert status == 409, body
    status, body = leader.request("POST", "/leader/resign")
    assert status == 200, body
    follower.wait_for(lambda s: bool(s.get("is_leader")), timeout=RENEW)
    assert wait_one_leader(group) is follower


def test_two_elections_do_not_collide(fleet: Callable[..., list[Sidecar]]) -> None:
    shop = fleet(2, election="shop")
    billing = fleet(2, election="billing")
    a, b = wait_one_leader(shop), wait_one_leader(billing)
    assert a.leader()["lease"]["name"] != b.leader()["lease"]["name"]
