"""Rollout awareness on the real API server: which replicas are outdated during an update.

The objects a Deployment controller would make (a Deployment, two ReplicaSets with their
revision annotations, their pods) are written by the test; the watcher reads them as it would in
a cluster. The whole rollout on a real node is in tests/node.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.backends.kubeclient import KubeApi
from sidecar.integration.rollout import RolloutWatcher
from tests.e2e.kubeobjects import create, owner
from tests.kube.cluster import Cluster

LABELS = {"app": "web"}
POD_SPEC = {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}


def revision(cluster: Cluster, ns: str, deployment: dict[str, Any], hash_: str, n: int) -> None:
    labels = {**LABELS, "pod-template-hash": hash_}
    create(
        cluster,
        f"/apis/apps/v1/namespaces/{ns}/replicasets",
        {
            "metadata": {
                "name": f"web-{hash_}",
                "labels": labels,
                "annotations": {"deployment.kubernetes.io/revision": str(n)},
                "ownerReferences": owner(deployment, "apps/v1", "Deployment"),
            },
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": POD_SPEC},
            },
        },
    )


def pod(cluster: Cluster, ns: str, hash_: str, name: str) -> None:
    _, replicaset = cluster.api("GET", f"/apis/apps/v1/namespaces/{ns}/replicasets/web-{hash_}")
    create(
        cluster,
        f"/api/v1/namespaces/{ns}/pods",
        {
            "metadata": {
                "name": name,
                "labels": {**LABELS, "pod-template-hash": hash_},
                "ownerReferences": owner(replicaset, "apps/v1", "ReplicaSet"),
            },
            "spec": POD_SPEC,
        },
    )


def set_ready(cluster: Cluster, ns: str, name: str, ready: bool) -> None:
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    status, answer = cluster.api(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/{name}/status",
        {"status": {"conditions": [condition]}},
    )
    assert status == 200, answer


async def test_a_replica_is_outdated_exactly_while_a_ready_pod_of_a_newer_revision_runs(
    kube_cluster: Cluster, namespace: str
) -> None:
    ns = namespace
    deployment = create(
        kube_cluster,
        f"/apis/apps/v1/namespaces/{ns}/deployments",
        {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"matchLabels": LABELS},
                "template": {"metadata": {"labels": LABELS}, "spec": POD_SPEC},
            },
        },
    )
    revision(kube_cluster, ns, deployment, "aaa", 1)
    revision(kube_cluster, ns, deployment, "bbb", 2)
    pod(kube_cluster, ns, "aaa", "web-aaa-1")
    set_ready(kube_cluster, ns, "web-aaa-1", True)

    api = KubeApi(str(kube_cluster.kubeconfig))
    await api.connect()
    old: asyncio.Queue[bool] = asyncio.Queue()
    new: asyncio.Queue[bool] = asyncio.Queue()
    watchers = [
        RolloutWatcher(api, ns, "web-aaa-1", old.put_nowait),
        RolloutWatcher(api, ns, "web-bbb-1", new.put_nowait),
    ]
    pod(kube_cluster, ns, "bbb", "web-bbb-1")  # not ready yet: nothing changes
    tasks = [asyncio.create_task(w.run()) for w in watchers]
    try:
        set_ready(kube_cluster, ns, "web-bbb-1", True)
        async with asyncio.timeout(10):
            assert await old.get() is True  # the old replica hands over
        set_ready(kube_cluster, ns, "web-bbb-1", False)
        async with asyncio.timeout(10):
            assert await old.get() is False  # a new pod that stops being ready does not count
        set_ready(kube_cluster, ns, "web-bbb-1", True)
        async with asyncio.timeout(10):
            assert await old.get() is True
        status, _ = kube_cluster.api("DELETE", f"/api/v1/namespaces/{ns}/pods/web-bbb-1")
        assert status == 200
        async with asyncio.timeout(10):
            assert await old.get() is False  # gone: the old revision may lead again
        # The newest revision is never outdated, whatever the old pods do.
        assert new.empty() and not watchers[1].outdated
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await api.close()
