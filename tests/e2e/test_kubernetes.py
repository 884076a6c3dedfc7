"""What only the Kubernetes backend has: operators, outages, RBAC, tokens, owner discovery."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.kubeobjects import create, owner
from tests.e2e.sidecars import (
    LEASE,
    RENEW,
    Sidecar,
    start_all,
    wait_one_leader,
)
from tests.kube.cluster import Cluster

LEASE_RULE = {
    "apiGroups": ["coordination.k8s.io"],
    "resources": ["leases"],
    "verbs": ["get", "watch", "create", "update"],
}


def lease_path(namespace: str, name: str = "") -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


def admin_args(cluster: Cluster, namespace: str, election: str = "shop") -> list[str]:
    return [
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--namespace",
        namespace,
        "--election",
        election,
    ]


def test_a_lease_deleted_by_an_operator_is_recreated(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    group = start_all(sidecars(f"r{i}", admin_args(kube_cluster, namespace)) for i in range(3))
    leader = wait_one_leader(group)
    name = leader.leader()["lease"]["name"]
    status, _ = kube_cluster.api("DELETE", lease_path(namespace, name))
    assert status == 200
    # Everyone notices through the watch; the Lease comes back with one holder.
    deadline = time.monotonic() + 10
    while True:
        status, lease = kube_cluster.api("GET", lease_path(namespace, name))
        if status == 200 and lease["spec"].get("holderIdentity"):
            break
        assert time.monotonic() < deadline, "the Lease was not recreated"
        group[0].wait_for(lambda s: True, timeout=0.1)  # let a streamed change pass
    new = wait_one_leader(group)
    assert lease["spec"]["holderIdentity"] == new.name
    assert lease["metadata"]["labels"]["leader-sidecar.io/election"] == "shop"


def test_a_lost_api_server_ends_leadership_before_the_renew_deadline(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    group = start_all(sidecars(f"r{i}", admin_args(kube_cluster, namespace)) for i in range(3))
    leader = wait_one_leader(group)
    try:
        stopped = time.monotonic()
        kube_cluster.stop_apiserver(kill=True)
        lost = leader.wait_for(lambda s: not s.get("is_leader"), timeout=RENEW + 2)
        # The last successful renewal was before the stop, so the deadline passed by then.
        assert lost - stopped <= RENEW + 0.3, f"still leader {lost - stopped:.3f}s after the stop"
        for sidecar in group:
            sidecar.wait_for(lambda s: s.get("state") == "unknown", timeout=LEASE + 5)
        status, health = leader.request("GET", "/healthz")
        assert status == 200
        assert health["status"] == "degraded"
        assert health["error"], health
    finally:
        kube_cluster.start_apiserver()
    wait_one_leader(group, timeout=30)


def test_a_user_without_rbac_on_leases_never_leads(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    kubeconfig = kube_cluster.kubeconfig_for("noaccess")
    sidecar = sidecars(
        "lonely",
        ["--kubeconfig", str(kubeconfig), "--namespace", namespace, "--election", "shop"],
    ).wait_started()
    sidecar.wait_for(lambda s: bool(s.get("error")), timeout=10)
    snapshot = sidecar.leader()
    assert snapshot["is_leader"] is False
    assert snapshot["state"] == "unknown"
    assert "RBAC denies" in snapshot["error"] and "leases" in snapshot["error"]
    status, health = sidecar.request("GET", "/healthz")
    assert "RBAC denies" in health["error"]
    status, ready = sidecar.request("GET", "/readyz")
    assert status == 503
    assert "RBAC denies" in ready["reason"]
    warnings = [e for e in sidecar.logs if e.get("event") == "backend error"]
    assert warnings and "RBAC denies" in warnings[0]["error"]
    assert all(not snapshot.get("is_leader") for _, snapshot in sidecar.events)


def _service_account(cluster: Cluster, namespace: str, name: str) -> None:
    for path, body in (
        (f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}}),
        (
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
            {"metadata": {"name": name}, "rules": [LEASE_RULE]},
        ),
        (
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        ),
    ):
        status, answer = cluster.api("POST", path, body)
        assert status == 201, answer


def _mint(cluster: Cluster, namespace: str, account: str) -> str:
    status, answer = cluster.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        {"spec": {"expirationSeconds": 3600}},
    )
    assert status == 201, answer
    return str(answer["status"]["token"])


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_suffix(".new")
    temp.write_text(text)
    temp.replace(path)  # kubelet also swaps the token file rather than writing into it


def test_in_cluster_credentials_follow_a_rotated_token(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar], tmp_path: Path
) -> None:
    for account in ("old", "new"):
        _service_account(kube_cluster, namespace, account)
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    (secrets / "ca.crt").write_text(kube_cluster.ca_file.read_text())
    (secrets / "namespace").write_text(namespace)
    _write_atomically(secrets / "token", _mint(kube_cluster, namespace, "old"))
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(kube_cluster.port),
    }
    # Roomy timings: an interruption here must come from the rotation, not from a starved CPU.
    roomy = ["--lease-duration", "9s", "--renew-deadline", "6s", "--retry-period", "0.5s"]
    sidecar = sidecars(
        "pod-0", ["--service-account-dir", str(secrets), "--election", "shop", *roomy], env
    ).wait_started()
    assert any(e.get("backend") == "kubernetes" for e in sidecar.logs)
    sidecar.wait_for(lambda s: bool(s.get("is_leader")))
    name = sidecar.leader()["lease"]["name"]
    # Rotate: a new token in the file, and the old one made worthless.
    _write_atomically(secrets / "token", _mint(kube_cluster, namespace, "new"))
    status, _ = kube_cluster.api("DELETE", f"/api/v1/namespaces/{namespace}/serviceaccounts/old")
    assert status == 200
    _, before = kube_cluster.api("GET", lease_path(namespace, name))
    # Several renewals later it still leads, and never stopped leading.
    deadline = time.monotonic() + 8 * 0.5  # eight renewals
    while time.monotonic() < deadline:
        sidecar.wait_for(lambda s: True, timeout=0.2)
    _, after = kube_cluster.api("GET", lease_path(namespace, name))
    assert after["spec"]["renewTime"] != before["spec"]["renewTime"]
    assert after["spec"]["holderIdentity"] == "pod-0"
    states = [s.get("is_leader") for _, s in sidecar.events]
    assert all(states[states.index(True) :]), (states, sidecar.log_text())  # never interrupted
    assert "backend error" not in sidecar.log_events()


def test_the_workload_is_discovered_from_the_pods_owners(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    labels = {"app": "checkout"}
    pod_spec = {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}
    deployment = create(
        kube_cluster,
        f"/apis/apps/v1/namespaces/{namespace}/deployments",
        {
            "metadata": {"name": "checkout"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        },
    )
    replicaset = create(
        kube_cluster,
        f"/apis/apps/v1/namespaces/{namespace}/replicasets",
        {
            "metadata": {
                "name": "checkout-5d8f",
                "ownerReferences": owner(deployment, "apps/v1", "Deployment"),
            },
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            },
        },
    )
    create(
        kube_cluster,
        f"/api/v1/namespaces/{namespace}/pods",
        {
            "metadata": {
                "name": "checkout-5d8f-x2x9z",
                "labels": labels,
                "ownerReferences": owner(replicaset, "apps/v1", "ReplicaSet"),
            },
            "spec": pod_spec,
        },
    )
    env = {"POD_NAME": "checkout-5d8f-x2x9z", "POD_NAMESPACE": namespace}
    sidecar = sidecars(
        "checkout-5d8f-x2x9z", ["--kubeconfig", str(kube_cluster.kubeconfig)], env
    ).wait_started()
    sidecar.wait_for(lambda s: bool(s.get("is_leader")))
    expected = "leader-sidecar-" + hashlib.sha256(b"checkout").hexdigest()[:16]
    assert sidecar.leader()["lease"]["name"] == expected
    _, lease = kube_cluster.api("GET", lease_path(namespace, expected))
    assert lease["metadata"]["labels"]["leader-sidecar.io/election"] == "checkout"

    # Without `get` on pods, discovery fails at start with the permission named: exit 2.
    denied = sidecars("denied", ["--kubeconfig", str(kube_cluster.kubeconfig_for("noaccess"))], env)
    assert denied.wait_exit() == 2
    message = " ".join(json.dumps(e) for e in denied.logs)
    assert "RBAC denies 'get' on pods" in message, message
    assert "--election" in message


def _edit_lease(cluster: Cluster, path: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """Read-modify-write as another client would, retrying when a renewal came first."""
    for _ in range(50):
        status, lease = cluster.api("GET", path)
        assert status == 200, lease
        edit(lease)
        status, answer = cluster.api("PUT", path, lease)
        if status == 200:
            return
        assert status == 409, answer
    raise AssertionError("could not write the Lease between the renewals")


def _renewals(cluster: Cluster, path: str, count: int, timeout: float = 10) -> dict[str, Any]:
    """Wait until the Lease was renewed `count` more times; the last version read."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while True:
        status, lease = cluster.api("GET", path)
        assert status == 200, lease
        seen.add(lease["spec"]["renewTime"])
        if len(seen) > count:
            return dict(lease)
        assert time.monotonic() < deadline, f"only {len(seen) - 1} renewals: {lease}"
        time.sleep(0.1)


class _CoordinatedLeaderElectionCluster(Cluster):
    """An API server that keeps the Lease spec fields `strategy` and `preferredHolder`: without
    its CoordinatedLeaderElection feature it drops them from every write, so no renewal could
    be seen keeping them."""

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        if name == "kube-apiserver":
            args = [
                *args,
                "--feature-gates=CoordinatedLeaderElection=true",
                "--runtime-config=coordination.k8s.io/v1beta1=true",
            ]
        return super()._spawn(name, args)


@pytest.fixture(scope="module")
def cle_cluster(
    kube_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A second, short-lived API server (same binaries as `kube_cluster`, which built them)."""
    with _CoordinatedLeaderElectionCluster(tmp_path_factory.mktemp("kube-cle")) as cluster:
        yield cluster


def test_what_others_put_on_the_lease_survives_renewals(
    cle_cluster: Cluster, sidecars: Callable[..., Sidecar]
) -> None:
    """Annotations, foreign labels, ownerReferences, finalizers and spec fields the sidecar does
    not own (`strategy`, `preferredHolder`) are carried over by every renewal, and our own
    labels stay."""
    cluster, namespace = cle_cluster, "default"
    leader = sidecars("r0", admin_args(cluster, namespace)).wait_started()
    leader.wait_for(lambda s: bool(s.get("is_leader")))
    path = lease_path(namespace, leader.leader()["lease"]["name"])
    _, owner = cluster.api(
        "POST", f"/api/v1/namespaces/{namespace}/configmaps", {"metadata": {"name": "owner"}}
    )
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }

    def foreign(lease: dict[str, Any]) -> None:
        metadata = lease["metadata"]
        metadata.setdefault("annotations", {})["team.example.com/owner"] = "payments"
        metadata["labels"]["cost-center"] = "42"
        metadata["ownerReferences"] = [reference]
        metadata["finalizers"] = ["example.com/keep"]
        lease["spec"]["strategy"] = "OldestEmulationVersion"
        lease["spec"]["preferredHolder"] = "r9"

    _edit_lease(cluster, path, foreign)
    _, written = cluster.api("GET", path)
    assert written["spec"]["strategy"] == "OldestEmulationVersion", written  # the server kept it
    after = _renewals(cluster, path, 3)
    metadata = after["metadata"]
    assert metadata["annotations"]["team.example.com/owner"] == "payments"
    assert metadata["labels"]["cost-center"] == "42"
    assert metadata["labels"]["leader-sidecar.io/election"] == "shop"
    assert metadata["labels"]["app.kubernetes.io/managed-by"] == "leader-sidecar"
    assert metadata["ownerReferences"] == [reference]
    assert metadata["finalizers"] == ["example.com/keep"]
    assert metadata["uid"] == written["metadata"]["uid"]
    assert after["spec"]["strategy"] == "OldestEmulationVersion"
    assert after["spec"]["preferredHolder"] == "r9"
    assert after["spec"]["holderIdentity"] == "r0"
    states = [s.get("is_leader") for _, s in leader.events]
    assert all(states[states.index(True) :]), (states, leader.log_text())  # never interrupted
    assert "backend error" not in leader.log_events()


def test_a_missing_namespace_is_reported_and_the_election_starts_once_it_exists(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    later = f"{namespace}-later"
    sidecar = sidecars("r0", admin_args(kube_cluster, later)).wait_started()
    try:
        sidecar.wait_for(lambda s: later in str(s.get("error") or ""), timeout=10)
        snapshot = sidecar.leader()
        assert snapshot["state"] == "unknown" and snapshot["is_leader"] is False
        assert f"namespace '{later}' does not exist" in snapshot["error"]
        time.sleep(1)  # a few retries later it still runs, and still says why
        assert sidecar.proc.poll() is None
        assert later in str(sidecar.leader().get("error"))
        status, body = kube_cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": later}})
        assert status == 201, body
        sidecar.wait_for(lambda s: bool(s.get("is_leader")), timeout=15)
        assert not sidecar.leader().get("error")
    finally:
        sidecar.stop()
        kube_cluster.api("DELETE", f"/api/v1/namespaces/{later}")
        kube_cluster.api(
            "PUT",
            f"/api/v1/namespaces/{later}/finalize",
            {"metadata": {"name": later}, "spec": {"finalizers": []}},
        )


def _metric(sidecar: Sidecar, name: str, label: str) -> float:
    """The sum of the sidecar's samples of `name` whose labels include `label`."""
    _, text = sidecar.request("GET", "/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in str(text).splitlines()
        if line.startswith(name + "{") and label in line
    )


def test_a_rotated_kubeconfig_token_does_not_cut_the_watch_in_flight(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar], tmp_path: Path
) -> None:
    """A 401 reloads the kubeconfig; the watch opened with the old credentials keeps running
    (the API server checked them when it opened it) and still reports changes at once."""
    for account in ("old", "new"):
        _service_account(kube_cluster, namespace, account)
    kubeconfig = tmp_path / "kubeconfig"
    kube_cluster.kubeconfig_for(_mint(kube_cluster, namespace, "old"), kubeconfig)
    # A long retry period: a change seen within it can only have come through the watch.
    slow = ["--lease-duration", "15s", "--renew-deadline", "10s", "--retry-period", "3s"]
    args = ["--kubeconfig", str(kubeconfig), "--namespace", namespace, "--election", "shop"]
    sidecar = sidecars("r0", [*args, *slow]).wait_started()
    sidecar.wait_for(lambda s: bool(s.get("is_leader")))
    watches = "leader_sidecar_api_request_duration_seconds_count"
    opened = _metric(sidecar, watches, 'verb="WATCH"')
    rotated = tmp_path / "kubeconfig.new"
    kube_cluster.kubeconfig_for(_mint(kube_cluster, namespace, "new"), rotated)
    rotated.replace(kubeconfig)
    status, _ = kube_cluster.api("DELETE", f"/api/v1/namespaces/{namespace}/serviceaccounts/old")
    assert status == 200
    deadline = time.monotonic() + 15
    while not _metric(sidecar, "leader_sidecar_api_request_errors_total", 'code="401"'):
        assert time.monotonic() < deadline, "the old token was never refused"
        time.sleep(0.1)
    sidecar.wait_for(lambda s: bool(s.get("is_leader")) and not s.get("error"), timeout=5)

    def intruder(lease: dict[str, Any]) -> None:
        lease["spec"]["holderIdentity"] = "intruder"
        lease["spec"]["leaseTransitions"] += 1

    _edit_lease(kube_cluster, lease_path(namespace, sidecar.leader()["lease"]["name"]), intruder)
    taken = time.monotonic()
    lost = sidecar.wait_for(lambda s: not s.get("is_leader"), timeout=10)
    assert lost - taken < 1.0, f"the takeover was seen after {lost - taken:.2f}s, not by the watch"
    assert _metric(sidecar, watches, 'verb="WATCH"') == opened, "the watch was reopened"
    assert "watch error" not in sidecar.log_events(), sidecar.log_text()
