"""Helpers for the pod-level tests and the rollout bench: helm installs of the example chart on
the one-node cluster, pods, Leases, logs, and the sidecar's process on the host."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tests.kube import helm
from tests.kube.leasewatch import LeaseWatch, changes_between
from tests.kube.node import Node

Json = dict[str, Any]
T = TypeVar("T")
LEASE = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{name}"
# What the node tests measured; printed in pytest's summary (tests/node/conftest.py).
FIGURES: dict[str, object] = {}


def wait(what: str, fn: Callable[[], T | None], timeout: float = 60.0, every: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except (OSError, KeyError, IndexError, ValueError) as e:
            last = e
        else:
            if value:
                return value
            last = value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def split_ref(ref: str) -> tuple[str, str]:
    repo, _, tag = ref.rpartition(":")
    return repo, tag


class Kube:
    """The node's API as admin, plus helm and the host view of its pods."""

    def __init__(self, node: Node, charts: Path, home: Path) -> None:
        self.node = node
        self.charts = charts
        self.home = home

    def api(self, method: str, path: str, body: Json | None = None, **kw: Any) -> Any:
        status, answer = self.node.api.api(method, path, body, **kw)
        if status >= 300:
            raise AssertionError(f"{method} {path}: {status} {answer}")
        return answer

    # -- namespaces and helm

    @contextlib.contextmanager
    def namespace(self, stem: str) -> Iterator[str]:
        name = f"{stem}-{secrets.token_hex(3)}"
        self.api("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        wait(
            "the namespace's ServiceAccount and root CA",
            lambda: (
                self.node.api.api("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0]
                == 200
                and self.node.api.api(
                    "GET", f"/api/v1/namespaces/{name}/configmaps/kube-root-ca.crt"
                )[0]
                == 200
            ),
            timeout=30,
        )
        try:
            yield name
        finally:
            # The controller-manager empties it; nothing to wait for.
            with contextlib.suppress(AssertionError, OSError):
                self.api("DELETE", f"/api/v1/namespaces/{name}")

    def example_values(self, replicas: int = 3, **le: Any) -> Json:
        """Values for charts/example-app with the node's images (never pulled)."""
        app_repo, app_tag = split_ref(self.node.app_image)
        repo, tag = split_ref(self.node.image)
        return {
            "replicaCount": replicas,
            "terminationGracePeriodSeconds": 10,
            "app": {"image": {"repository": app_repo, "tag": app_tag, "pullPolicy": "Never"}},
            "leaderElection": {
                "enabled": True,
                "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
                **le,
            },
        }

    def helm(self, *args: str | Path) -> str:
        return helm.run(*args, "--kubeconfig", self.node.kubeconfig, home=self.home).stdout

    def install(self, release: str, ns: str, values: Json, chart: str = "example-app") -> None:
        values_file = self.home / f"values-{release}-{ns}.json"
        values_file.write_text(json.dumps(values))
        self.helm(
            "upgrade", "--install", release, self.charts / chart, "--namespace", ns,
            "--values", values_file,
        )  # fmt: skip

    # -- objects

    def pods(self, ns: str, selector: str = "") -> list[Json]:
        q = f"?labelSelector={urllib.parse.quote(selector)}" if selector else ""
        items: list[Json] = self.api("GET", f"/api/v1/namespaces/{ns}/pods{q}")["items"]
        return items

    def pod(self, ns: str, name: str) -> Json:
        pod: Json = self.api("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
        return pod

    def lease(self, ns: str, name: str) -> Json | None:
        status, body = self.node.api.api("GET", LEASE.format(ns=ns, name=name))
        return body if status == 200 else None

    def holder(self, ns: str, name: str) -> str:
        lease = self.lease(ns, name)
        return str((lease or {}).get("spec", {}).get("holderIdentity") or "")

    def logs(self, ns: str, pod: str, container: str) -> str:
        status, body = self.node.api.api(
            "GET", f"/api/v1/namespaces/{ns}/pods/{pod}/log?container={container}"
        )
        if status != 200:
            raise AssertionError(f"logs of {pod}/{container}: {status} {body}")
        return body if isinstance(body, str) else json.dumps(body)

    def running_pods(self, ns: str, selector: str) -> list[Json]:
        return [
            p
            for p in self.pods(ns, selector)
            if p["status"].get("phase") == "Running" and "deletionTimestamp" not in p["metadata"]
        ]

    def wait_ready(self, ns: str, selector: str, count: int, timeout: float = 120.0) -> list[Json]:
        def ready() -> list[Json] | None:
            pods = [p for p in self.running_pods(ns, selector) if is_ready(p)]
            return pods if len(pods) == count and len(self.pods(ns, selector)) == count else None

        return wait(f"{count} Ready pods ({selector})", ready, timeout=timeout, every=0.3)

    def deployment(self, ns: str, name: str) -> Json:
        d: Json = self.api("GET", f"/apis/apps/v1/namespaces/{ns}/deployments/{name}")
        return d

    def rollout_restart(self, ns: str, name: str) -> None:
        """What `kubectl rollout restart` does: a new template annotation."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        self.api(
            "PATCH",
            f"/apis/apps/v1/namespaces/{ns}/deployments/{name}",
            {
                "spec": {
                    "template": {
                        "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": now}}
                    }
                }
            },
            content_type="application/strategic-merge-patch+json",
        )

    def rollout_done(self, ns: str, name: str, selector: str) -> bool:
        d = self.deployment(ns, name)
        s, want = d.get("status", {}), d["spec"]["replicas"]
        return bool(
            s.get("observedGeneration", 0) >= d["metadata"]["generation"]
            and s.get("updatedReplicas") == want
            and s.get("availableReplicas") == want
            and s.get("replicas") == want
            and len(self.pods(ns, selector)) == want  # terminating old pods gone too
        )

    def watch_lease(self, ns: str, name: str) -> LeaseWatch:
        api = self.node.api
        return LeaseWatch(api.host, api.port, api.admin_token, api.ssl_context(), ns, name)

    # -- the host's view of containers

    def container_id(self, pod: Json, name: str) -> str:
        statuses = pod["status"].get("initContainerStatuses", []) + pod["status"].get(
            "containerStatuses", []
        )
        (status,) = [s for s in statuses if s["name"] == name]
        return str(status["containerID"]).split("://", 1)[1]

    def container_pid(self, pod: Json, name: str) -> int:
        cid = self.container_id(pod, name)
        for line in self.node.ctr("tasks", "ls").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise AssertionError(f"no task for container {name} ({cid})")

    def restart_count(self, ns: str, pod: str, name: str) -> int:
        p = self.pod(ns, pod)
        statuses = p["status"].get("initContainerStatuses", []) + p["status"].get(
            "containerStatuses", []
        )
        return int(next(s["restartCount"] for s in statuses if s["name"] == name))


def is_ready(pod: Json) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def sse_states(log: str) -> list[Json]:
    """The `data:` payloads of the demo app's log (curl printing the SSE stream)."""
    out = []
    for line in log.splitlines():
        if line.startswith("data:"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line[5:]))
    return out


def proc_start_boottime(pid: int) -> float:
    """A process's start, in seconds on CLOCK_BOOTTIME (what /proc/PID/stat counts in)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


# Runs inside a pod's network namespace (nsenter -n): polls the sidecar's /readyz and prints
# the CLOCK_BOOTTIME of the first 200 that follows a refused connection (a restart).
READY_POLLER = r"""
import socket, sys, time
port, seen_down = int(sys.argv[1]), False
print("polling", flush=True)
while True:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            head = s.recv(64)
        if seen_down and head.split(b" ")[1:2] == [b"200"]:
            print(time.clock_gettime(time.CLOCK_BOOTTIME), flush=True)
            break
    except OSError:
        seen_down = True
    time.sleep(0.005)
"""


@contextlib.contextmanager
def ready_poller(netns_pid: int, port: int = 4040) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        ["nsenter", "-t", str(netns_pid), "-n", sys.executable, "-c", READY_POLLER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "polling"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()


RELEASE = "shop"


@dataclass
class App:
    ns: str
    deployment: str
    selector: str
    lease: str

    def pods(self, kube: Kube) -> list[Json]:
        return kube.running_pods(self.ns, self.selector)

    def leader_pod(self, kube: Kube) -> Json:
        holder = kube.holder(self.ns, self.lease)
        (pod,) = [p for p in self.pods(kube) if p["metadata"]["name"] == holder]
        return pod


def install_app(kube: Kube, ns: str, replicas: int = 3, **values: object) -> App:
    """charts/example-app with leader election on (`values`: the library's settings)."""
    kube.install(RELEASE, ns, kube.example_values(replicas, **values))
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=example-app"
    pods = kube.wait_ready(ns, selector, replicas)
    lease = pods[0]["metadata"]["annotations"]["leader-sidecar.io/lease"]
    names = {p["metadata"]["name"] for p in pods}
    # (A new election's first leader may wait out one lease duration: 15 s by default.)
    wait("a leader", lambda: kube.holder(ns, lease) in names, timeout=60)
    return App(ns, f"{RELEASE}-example-app", selector, lease)


def measure_rollout(kube: Kube, app: App, timeout: float = 240.0) -> tuple[int, list[float]]:
    """One `kubectl rollout restart` as an independent watch on the Lease sees it: leadership
    changes and each leaderless gap (seconds)."""
    with kube.watch_lease(app.ns, app.lease) as watch:
        time.sleep(0.5)
        start = time.monotonic()
        kube.rollout_restart(app.ns, app.deployment)
        wait(
            "the rollout",
            lambda: kube.rollout_done(app.ns, app.deployment, app.selector),
            timeout,
            every=0.5,
        )
        new = {p["metadata"]["name"] for p in kube.pods(app.ns, app.selector)}
        wait("a leader among the new pods", lambda: kube.holder(app.ns, app.lease) in new, 60)
        time.sleep(1)
        c = changes_between(list(watch.events), start, time.monotonic())
    return c.changes, c.leaderless
