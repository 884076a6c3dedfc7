"""The test cluster itself: auth, RBAC, TokenRequest and an apiserver restart."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kube.cluster import Cluster


def _leases(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"


def _create_lease(c: Cluster, namespace: str, name: str) -> None:
    lease: dict[str, Any] = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name},
        "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 15},
    }
    status, body = c.api("POST", _leases(namespace), lease)
    assert status == 201, body


def test_admin_creates_and_reads_lease(kube_cluster: Cluster, namespace: str) -> None:
    _create_lease(kube_cluster, namespace, "smoke")
    status, body = kube_cluster.api("GET", f"{_leases(namespace)}/smoke")
    assert (status, body["spec"]["holderIdentity"]) == (200, "pod-a")


def test_user_without_rbac_is_forbidden(kube_cluster: Cluster, namespace: str) -> None:
    _create_lease(kube_cluster, namespace, "smoke")
    token = kube_cluster.token_for("noaccess")
    # Authenticated (discovery is open to all users) but no RBAC on leases: 403, not 401.
    assert kube_cluster.api("GET", "/api", token=token)[0] == 200
    status, body = kube_cluster.api("GET", f"{_leases(namespace)}/smoke", token=token)
    assert status == 403, body


def test_service_account_token_authenticates(kube_cluster: Cluster, namespace: str) -> None:
    c = kube_cluster
    status, body = c.api(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": "smoke"}}
    )
    assert status == 201, body
    token = c.create_token(namespace, "smoke")
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    status, body = c.api(
        "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", review, token=token
    )
    assert status == 201, body
    assert body["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:smoke"
    assert token in c.kubeconfig_for(token).read_text()


def test_apiserver_restart_keeps_port_and_data(kube_cluster: Cluster, namespace: str) -> None:
    c = kube_cluster
    _create_lease(c, namespace, "smoke")
    port = c.port
    c.stop_apiserver()
    with pytest.raises(OSError):  # really down: nothing listens on the port
        c.api("GET", "/readyz", timeout=2)
    c.start_apiserver()
    assert c.port == port
    status, body = c.api("GET", f"{_leases(namespace)}/smoke")
    assert (status, body["spec"]["holderIdentity"]) == (200, "pod-a")
