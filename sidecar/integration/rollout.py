"""Rolling updates move leadership once (`--rollout-aware`).

A Deployment names each of its ReplicaSets `<deployment>-<pod-template-hash>` and numbers them in
the annotation `deployment.kubernetes.io/revision`. This replica's revision is its own
ReplicaSet's. It is *outdated* while a Ready, not terminating pod of the same Deployment belongs
to a ReplicaSet with a higher revision: the election then hands leadership to such a pod and the
old pods leave a free Lease to the new ones (see `SetOutdated` in sidecar/election/core.py). This
only chooses where leadership goes; what keeps it safe is unchanged.

Reads: the own Pod and ReplicaSets (`get`), the Deployment's pods (`list`, `watch`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from sidecar.backends.kubeclient import ApiError, KubeApi, Unreachable

REVISION = "deployment.kubernetes.io/revision"
HASH = "pod-template-hash"
WATCH_SECONDS = 300
IDLE_SECONDS = 330.0  # pods of a quiet Deployment may not change for the whole watch


@dataclass(frozen=True, slots=True)
class _Pod:
    hash: str
    ready: bool
    terminating: bool


class RolloutWatcher:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        pod_name: str,
        on_change: Callable[[bool], None],
        timeout: float = 10.0,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._pod_name = pod_name
        self._on_change = on_change
        self._timeout = timeout
        self._log: Any = structlog.get_logger("rollout")
        self._revisions: dict[str, int] = {}  # pod-template-hash -> revision
        self._pods: dict[str, _Pod] = {}
        self._outdated = False
        self._deployment = ""
        self._own_hash = ""
        self._own_revision = 0
        self._selector = ""

    @property
    def outdated(self) -> bool:
        return self._outdated

    async def run(self) -> None:
        """Follow the Deployment's pods until cancelled; errors back off and retry."""
        delay = 0.5
        while True:
            try:
                if not self._deployment and not await self._find_own_revision():
                    await asyncio.Event().wait()  # not a Deployment's pod: nothing to follow
                await self._follow_pods()
                delay = 0.5
            except (ApiError, Unreachable, ValueError, KeyError, TypeError) as exc:
                self._log.warning("cannot follow the rollout", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(delay * 2, 30.0)

    async def _find_own_revision(self) -> bool:
        pod = await self._get(f"/api/v1/namespaces/{self._namespace}/pods/{self._pod_name}")
        owner = _controller(pod)
        if owner is None or owner.get("kind") != "ReplicaSet":
            self._log.info("this pod is not a Deployment's: rollout awareness is off")
            return False
        replicaset = await self._get(self._replicaset_path(str(owner["name"])))
        labels = replicaset["metadata"].get("labels") or {}
        self._own_hash = str(labels.get(HASH, ""))
        deployment = _controller(replicaset)
        if deployment is None or not self._own_hash:
            self._log.info("this pod's ReplicaSet has no Deployment: rollout awareness is off")
            return False
        self._deployment = str(deployment["name"])
        self._own_revision = _revision(replicaset)
        self._revisions[self._own_hash] = self._own_revision
        selector = dict((replicaset.get("spec") or {}).get("selector", {}).get("matchLabels", {}))
        selector.pop(HASH, None)
        self._selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        self._log.info(
            "following the rollout", deployment=self._deployment, revision=self._own_revision
        )
        return True

    async def _follow_pods(self) -> None:
        path = f"/api/v1/namespaces/{self._namespace}/pods"
        listed = await self._api.request(
            "GET", path, timeout=self._timeout, query={"labelSelector": self._selector}
        )
        self._pods = {item["metadata"]["name"]: _pod(item) for item in listed.get("items") or []}
        await self._recompute()
        query = {
            "watch": "true",
            "labelSelector": self._selector,
            "resourceVersion": str(listed["metadata"]["resourceVersion"]),
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        events = self._api.stream(path, query, timeout=self._timeout, idle_timeout=IDLE_SECONDS)
        try:
            async for event in events:
                kind, obj = event.get("type"), event.get("object") or {}
                if kind in ("ADDED", "MODIFIED"):
                    self._pods[obj["metadata"]["name"]] = _pod(obj)
                elif kind == "DELETED":
                    self._pods.pop(obj["metadata"]["name"], None)
                elif kind == "ERROR":
                    return  # 410 Gone and friends: list again
                else:
                    continue
                await self._recompute()
        finally:
            await events.aclose()

    async def _recompute(self) -> None:
        newer = False
        for pod in self._pods.values():
            other = pod.ready and not pod.terminating and pod.hash not in ("", self._own_hash)
            if other and await self._revision_of(pod.hash) > self._own_revision:
                newer = True
                break
        if newer != self._outdated:
            self._outdated = newer
            self._log.info("rollout", outdated=newer, revision=self._own_revision)
            self._on_change(newer)

    async def _revision_of(self, pod_hash: str) -> int:
        if pod_hash not in self._revisions:
            try:
                replicaset = await self._get(
                    self._replicaset_path(f"{self._deployment}-{pod_hash}")
                )
            except ApiError as exc:
                if exc.status != 404:
                    raise
                return 0  # not this Deployment's (yet): ask again next time
            self._revisions[pod_hash] = _revision(replicaset)
        return self._revisions[pod_hash]

    def _replicaset_path(self, name: str) -> str:
        return f"/apis/apps/v1/namespaces/{self._namespace}/replicasets/{name}"

    async def _get(self, path: str) -> dict[str, Any]:
        answer = await self._api.request("GET", path, timeout=self._timeout)
        if not isinstance(answer, dict):
            raise ValueError(f"GET {path}: not a JSON object")
        return answer


def _controller(obj: dict[str, Any]) -> dict[str, Any] | None:
    for owner in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if owner.get("controller"):
            return dict(owner)
    return None


def _revision(replicaset: dict[str, Any]) -> int:
    annotations = (replicaset.get("metadata") or {}).get("annotations") or {}
    try:
        return int(annotations.get(REVISION, "0"))
    except ValueError:
        return 0


def _pod(obj: dict[str, Any]) -> _Pod:
    metadata = obj.get("metadata") or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    return _Pod(
        hash=str((metadata.get("labels") or {}).get(HASH, "")),
        ready=ready,
        terminating=bool(metadata.get("deletionTimestamp")),
    )
