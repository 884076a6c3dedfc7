"""Which workload this pod belongs to: its ownerReferences, Pod -> ReplicaSet -> Deployment."""

from __future__ import annotations

from typing import Any

from sidecar.backends.kubeclient import ApiError, KubeApi, Unreachable
from sidecar.config import ConfigError

TIMEOUT = 10.0


def _controller(obj: dict[str, Any]) -> dict[str, Any] | None:
    for owner in obj.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("controller"):
            return dict(owner)
    return None


async def _get(api: KubeApi, path: str, what: str, namespace: str) -> dict[str, Any]:
    try:
        return dict(await api.request("GET", path, timeout=TIMEOUT))
    except ApiError as exc:
        if exc.status == 403:
            raise ConfigError(
                f"RBAC denies 'get' on {what} in namespace {namespace!r}, needed to discover the "
                "workload: grant it, or pass --election NAME"
            ) from None
        raise ConfigError(f"cannot discover the workload: GET {path}: {exc}") from None
    except Unreachable as exc:
        raise ConfigError(f"cannot discover the workload: {exc}") from None


async def discover_workload(api: KubeApi, namespace: str, pod_name: str) -> str:
    if not pod_name:
        raise ConfigError(
            "no --election given and no POD_NAME to discover the workload from: pass "
            "--election NAME, or set POD_NAME from the Downward API (fieldRef metadata.name)"
        )
    pod = await _get(api, f"/api/v1/namespaces/{namespace}/pods/{pod_name}", "pods", namespace)
    owner = _controller(pod)
    if owner is None:
        raise ConfigError(
            f"pod {namespace}/{pod_name} has no controlling owner to name the election after: "
            "pass --election NAME"
        )
    if owner.get("kind") == "ReplicaSet":
        path = f"/apis/apps/v1/namespaces/{namespace}/replicasets/{owner['name']}"
        replicaset = await _get(api, path, "replicasets.apps", namespace)
        deployment = _controller(replicaset)
        if deployment is not None:
            return str(deployment["name"])
    return str(owner["name"])
