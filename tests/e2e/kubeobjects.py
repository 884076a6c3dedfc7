"""Writing Kubernetes objects as an admin, for tests that play a controller's part."""

from __future__ import annotations

from typing import Any

from tests.kube.cluster import Cluster


def create(cluster: Cluster, path: str, body: dict[str, Any]) -> dict[str, Any]:
    status, answer = cluster.api("POST", path, body)
    assert status == 201, answer
    return dict(answer)


def owner(obj: dict[str, Any], api_version: str, kind: str) -> list[dict[str, Any]]:
    """ownerReferences naming `obj` as the controlling owner."""
    meta = obj["metadata"]
    ref = {"apiVersion": api_version, "kind": kind, "name": meta["name"], "uid": meta["uid"]}
    return [{**ref, "controller": True}]
