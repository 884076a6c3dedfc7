"""The chart's `apiToken` values: the Secret reaches the sidecar as --api-token-file (mounted as
a directory, so a rotation reaches it) and the app as LEADER_SIDECAR_API_TOKEN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.kube import helm


@pytest.fixture(scope="module")
def charts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    helm.build()
    return helm.prepare_charts(tmp_path_factory.mktemp("charts"))


def pod(charts: Path, tmp_path: Path, values: dict[str, Any]) -> dict[str, Any]:
    _, docs = helm.template(charts / "example-app", "shop", "default", values, home=tmp_path)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def test_the_api_token_secret_reaches_the_sidecar_and_the_app(charts: Path, tmp_path: Path) -> None:
    values = {"leaderElection": {"enabled": True, "apiToken": {"secretName": "shop-api"}}}
    spec = pod(charts, tmp_path, values)
    (sidecar,) = spec["initContainers"]
    path = "/var/run/secrets/leader-sidecar/api-token"
    assert f"--api-token-file={path}/token" in sidecar["args"]
    assert "--api-token-reads" not in sidecar["args"]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["leader-sidecar-api-token"] == {
        "name": "leader-sidecar-api-token",
        "mountPath": path,
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["leader-sidecar-api-token"]["secret"]["secretName"] == "shop-api"
    (app,) = spec["containers"]
    env = {e["name"]: e for e in app["env"]}
    assert env["LEADER_SIDECAR_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "shop-api",
        "key": "token",
    }
    assert all("api-token" not in m["name"] for m in app.get("volumeMounts", []))


def test_reads_by_value_and_no_trace_without_a_secret(charts: Path, tmp_path: Path) -> None:
    values = {"leaderElection": {"enabled": True, "apiToken": {"secretName": "s", "reads": True}}}
    (sidecar,) = pod(charts, tmp_path / "a", values)["initContainers"]
    assert "--api-token-reads" in sidecar["args"]
    spec = pod(charts, tmp_path / "b", {"leaderElection": {"enabled": True}})
    (sidecar,) = spec["initContainers"]
    assert not any("api-token" in arg for arg in sidecar["args"])
    assert all("api-token" not in v["name"] for v in spec["volumes"])
    (app,) = spec["containers"]
    assert "LEADER_SIDECAR_API_TOKEN" not in {e["name"] for e in app.get("env", [])}
