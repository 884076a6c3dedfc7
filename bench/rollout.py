"""Rolling updates on a real node: leader-sidecar next to client-go's elector, same run.

    python bench/rollout.py [--rollouts 5] [--json bench/rollout-results.json]   (as root)

Starts the one-node cluster (tests/kube/node.py: kubelet + containerd; built on first use) and
rolls two Deployments of 3 replicas `--rollouts` times each, as `kubectl rollout restart` does:

- leader-sidecar: charts/example-app installed with helm, `leaderElection.enabled=true`, the
  library chart's defaults (15 s / 10 s / 2 s; the demo app resigns in its preStop hook);
- client-go: bench/clientgo (tools/leaderelection, LeaseLock, ReleaseOnCancel, the same timings)
  as the only container of each pod, in a `FROM scratch` image.

An independent watch on each Lease (tests/kube/leasewatch.py) counts leadership changes per
rollout and the leaderless time: from a release (empty holder) to the next holder, or, for a
takeover without a release, from the moment the last renewal would have expired.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.kube import helm  # noqa: E402
from tests.kube.node import Node  # noqa: E402
from tests.node.kube import App, Kube, install_app, measure_rollout, wait  # noqa: E402

Json = dict[str, Any]
CLIENTGO_LEASE = "clientgo-rollout"


def clientgo_app(kube: Kube, ns: str, replicas: int = 3) -> App:
    """A Deployment whose only container is client-go's elector, with least-privilege RBAC."""
    base = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
    kube.api("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "clientgo"}})
    kube.api(
        "POST",
        f"{base}/roles",
        {
            "metadata": {"name": "clientgo"},
            "rules": [
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["get", "create", "update"],
                }
            ],
        },
    )
    kube.api(
        "POST",
        f"{base}/rolebindings",
        {
            "metadata": {"name": "clientgo"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "clientgo",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "clientgo", "namespace": ns}],
        },
    )

    def field(path: str) -> Json:
        return {"fieldRef": {"fieldPath": path}}

    kube.api(
        "POST",
        f"/apis/apps/v1/namespaces/{ns}/deployments",
        {
            "metadata": {"name": "clientgo"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "clientgo"}},
                "template": {
                    "metadata": {"labels": {"app": "clientgo"}},
                    "spec": {
                        "serviceAccountName": "clientgo",
                        "terminationGracePeriodSeconds": 10,
                        "containers": [
                            {
                                "name": "elector",
                                "image": kube.node.clientgo_image,
                                "imagePullPolicy": "Never",
                                "args": [
                                    "--id=$(POD_NAME)",
                                    "--namespace=$(POD_NAMESPACE)",
                                    f"--lease-name={CLIENTGO_LEASE}",
                                ],
                                "env": [
                                    {"name": "POD_NAME", "valueFrom": field("metadata.name")},
                                    {
                                        "name": "POD_NAMESPACE",
                                        "valueFrom": field("metadata.namespace"),
                                    },
                                ],
                                "securityContext": {
                                    "runAsNonRoot": True,
                                    "runAsUser": 65532,
                                    "readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                            }
                        ],
                    },
                },
            },
        },
    )
    selector = "app=clientgo"
    names = {p["metadata"]["name"] for p in kube.wait_ready(ns, selector, replicas)}
    wait("a client-go leader", lambda: kube.holder(ns, CLIENTGO_LEASE) in names, timeout=60)
    return App(ns, "clientgo", selector, CLIENTGO_LEASE)


def summarize(runs: list[tuple[int, list[float]]]) -> Json:
    changes = [c for c, _ in runs]
    totals = [sum(g) for _, g in runs]
    gaps = [g for _, gs in runs for g in gs]
    return {
        "rollouts": len(runs),
        "changes_per_rollout": changes,
        "changes_mean": round(statistics.mean(changes), 2),
        "leaderless_total_ms_per_rollout": [round(t * 1000) for t in totals],
        "leaderless_total_ms_p50": round(statistics.median(totals) * 1000),
        "leaderless_per_change_ms": [round(g * 1000) for g in gaps],
        "leaderless_per_change_ms_p50": round(statistics.median(gaps) * 1000) if gaps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rollouts", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "rollout-results.json")
    args = parser.parse_args(argv)
    results: Json = {
        "machine": {
            "cpus": len(__import__("os").sched_getaffinity(0)),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "timings": "15s / 10s / 2s (both)",
    }
    with Node() as node, tempfile.TemporaryDirectory(prefix="rollout-bench.") as tmp:
        home = Path(tmp)
        kube = Kube(node, helm.prepare_charts(home), home)
        for system in ("leader-sidecar", "client-go"):
            with kube.namespace(system) as ns:
                app = (
                    install_app(kube, ns) if system == "leader-sidecar" else clientgo_app(kube, ns)
                )
                runs = []
                for i in range(args.rollouts):
                    time.sleep(3)  # let the new leader settle (client-go: its first renewals)
                    runs.append(measure_rollout(kube, app))
                    print(f"{system} rollout {i + 1}: {runs[-1]}", file=sys.stderr, flush=True)
                results[system] = summarize(runs)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    ls, go = results["leader-sidecar"], results["client-go"]
    print(
        "| metric | leader-sidecar | client-go |\n|---|---|---|\n"
        f"| leadership changes per rollout of 3 replicas (mean; each) | {ls['changes_mean']}"
        f" ({ls['changes_per_rollout']}) | {go['changes_mean']} ({go['changes_per_rollout']}) |\n"
        f"| leaderless time per rollout p50 | {ls['leaderless_total_ms_p50']} ms"
        f" | {go['leaderless_total_ms_p50']} ms |\n"
        f"| leaderless time per change p50 | {ls['leaderless_per_change_ms_p50']} ms"
        f" | {go['leaderless_per_change_ms_p50']} ms |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
