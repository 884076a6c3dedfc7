"""The sidecar in real pods: the image built from the Dockerfile, the example chart installed with
helm on a one-node cluster (kubelet + containerd + runc), the in-cluster API path, the native
sidecar's lifecycle, and rolling updates."""

from __future__ import annotations

import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli import OPTIONS
from tests.kube import images
from tests.node.kube import (
    FIGURES,
    RELEASE,
    App,
    Json,
    Kube,
    install_app,
    is_ready,
    measure_rollout,
    proc_start_boottime,
    ready_poller,
    rss_bytes,
    sse_states,
    wait,
)

LEASE_DURATION = 6.0  # seconds; renew deadline 4 s, retry period 0.8 s (the chart derives them)


@pytest.fixture(scope="module")
def shop(kube_node: Kube) -> Iterator[App]:
    """The example app with leader election on, 3 replicas, the pod label for a Service."""
    with kube_node.namespace("shop") as ns:
        yield install_app(kube_node, ns, leaseDuration=f"{LEASE_DURATION:.0f}s", labelPod=True)


def app_states(kube: Kube, app: App, pod: str) -> list[Json]:
    return sse_states(kube.logs(app.ns, pod, "app"))


def settled(kube: Kube, app: App) -> str | None:
    """The leader, once the Lease and every app agree on it and exactly one app leads."""
    holder = kube.holder(app.ns, app.lease)
    pods = app.pods(kube)
    if not holder or len(pods) != 3:
        return None
    last = [(app_states(kube, app, p["metadata"]["name"]) or [{}])[-1] for p in pods]
    leaders = [p["metadata"]["name"] for p, s in zip(pods, last, strict=True) if s.get("is_leader")]
    if leaders == [holder] and all(s.get("name") == holder for s in last):
        return holder
    return None


# --------------------------------------------------------------------------- the image


def test_the_image_is_the_dockerfile_built_on_a_python_3_11_bookworm_base(kube_node: Kube) -> None:
    config = json.loads(
        images.buildah("inspect", "--type", "image", kube_node.node.image, capture=True)
    )["OCIv1"]["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["leader-sidecar"] and config["Cmd"] == ["run"]
    probe = images.buildah("from", "--quiet", images.base_ref(), capture=True).strip()
    try:
        version = images.buildah(
            "run", "--isolation", "chroot", probe, "--", "python", "--version", capture=True
        )
    finally:
        images.buildah("rm", probe, capture=True)
    assert version.startswith("Python 3.11.")


# --------------------------------------------------------------------------- the chart


def test_pods_are_ready_with_one_leader_that_every_app_and_the_status_command_name(
    kube_node: Kube, shop: App
) -> None:
    leader = wait("every app to name the one leader", lambda: settled(kube_node, shop), 30)
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", "-n", shop.ns, "-o", "json",
         "--kubeconfig", str(kube_node.node.kubeconfig)],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert leader in out and shop.lease in out


def test_the_sidecar_runs_as_non_root_on_a_read_only_root_with_the_in_cluster_token(
    kube_node: Kube, shop: App
) -> None:
    pod = shop.pods(kube_node)[0]
    pid = kube_node.container_pid(pod, "leader-sidecar")
    status = Path(f"/proc/{pid}/status").read_text()
    assert "\nUid:\t65532\t65532\t65532\t65532\n" in status
    root = Path(f"/proc/{pid}/root")
    with pytest.raises(OSError, match="Read-only file system"):
        (root / "opt" / "probe").write_text("x")
    env = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
        if "=" in item
    )
    # The in-cluster way: the `kubernetes` Service and the projected token, no kubeconfig.
    assert env["KUBERNETES_SERVICE_HOST"] == "10.0.0.1" and "KUBECONFIG" not in env
    assert env["POD_TEMPLATE_HASH"] == pod["metadata"]["labels"]["pod-template-hash"]
    assert env["LEADER_SIDECAR_ROLLOUT_AWARE"] == "true"
    # (/var/run is a link to /run in the image: the kubelet's mount is at /run/secrets.)
    token = (root / "run/secrets/kubernetes.io/serviceaccount/token").read_text()
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["kubernetes.io"]["pod"]["name"] == pod["metadata"]["name"]  # bound, projected
    # ... mounted into the sidecar only.
    app_pid = kube_node.container_pid(pod, "app")
    assert not Path(f"/proc/{app_pid}/root/run/secrets/kubernetes.io").exists()


def test_a_service_selecting_the_role_label_routes_to_the_leader_only(
    kube_node: Kube, shop: App
) -> None:
    kube_node.api(
        "POST",
        f"/api/v1/namespaces/{shop.ns}/services",
        {
            "metadata": {"name": "leader"},
            "spec": {
                "selector": {
                    "app.kubernetes.io/instance": RELEASE,
                    "app.kubernetes.io/name": "example-app",
                    "leader-sidecar.io/role": "leader",
                },
                "ports": [{"port": 80, "targetPort": 8080}],
            },
        },
    )

    def endpoints() -> list[str]:
        slices = kube_node.api(
            "GET",
            f"/apis/discovery.k8s.io/v1/namespaces/{shop.ns}/endpointslices"
            "?labelSelector=kubernetes.io%2Fservice-name%3Dleader",
        )["items"]
        return sorted(a for s in slices for e in s.get("endpoints") or [] for a in e["addresses"])

    leader = shop.leader_pod(kube_node)
    assert wait("the leader's endpoint", lambda: endpoints() == [leader["status"]["podIP"]], 20)


# --------------------------------------------------------------------------- lifecycle


def test_deleting_the_leader_pod_tells_its_app_first_and_a_new_leader_follows_within_1s(
    kube_node: Kube, shop: App
) -> None:
    wait("a settled election", lambda: settled(kube_node, shop), 30)
    old = shop.leader_pod(kube_node)["metadata"]["name"]
    with kube_node.watch_lease(shop.ns, shop.lease) as watch:
        time.sleep(0.3)  # the watch is open
        t0 = time.monotonic()
        kube_node.api("DELETE", f"/api/v1/namespaces/{shop.ns}/pods/{old}")
        taken = watch.wait_for(lambda e: e.holder not in ("", old), timeout=10)
        released = [e for e in watch.events if e.at >= t0 and e.holder == ""]
        # The old app keeps logging until its container stops: read it while it is there.
        last_log: list[Json] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                last_log = app_states(kube_node, shop, old)
            except AssertionError:
                break  # the pod is gone
            if last_log and not last_log[-1].get("is_leader"):
                break
            time.sleep(0.1)
    handover = taken.at - t0
    FIGURES["pod delete -> new leader (s)"] = round(handover, 3)
    if released:
        FIGURES["release -> new leader (ms)"] = round((taken.at - released[0].at) * 1000, 1)
    assert handover <= 1.0, f"new leader {handover:.3f}s after the delete"
    assert released, "the leaving leader released the Lease"
    leads = [s["is_leader"] for s in last_log]
    assert True in leads and leads[-1] is False, f"the old app heard: {last_log}"
    kube_node.wait_ready(shop.ns, shop.selector, 3)
    wait("a settled election", lambda: settled(kube_node, shop), 30)


def test_killing_the_sidecar_process_restarts_it_and_never_makes_a_second_leader(
    kube_node: Kube, shop: App
) -> None:
    leader = wait("a settled election", lambda: settled(kube_node, shop), 30)
    pod = shop.leader_pod(kube_node)
    name = pod["metadata"]["name"]
    pid = kube_node.container_pid(pod, "leader-sidecar")
    restarts = kube_node.restart_count(shop.ns, name, "leader-sidecar")
    app_restarts = kube_node.restart_count(shop.ns, name, "app")
    seen_before = len(app_states(kube_node, shop, name))
    with kube_node.watch_lease(shop.ns, shop.lease) as watch, ready_poller(pid) as poller:
        time.sleep(0.3)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait(
            "the kubelet to restart the sidecar",
            lambda: kube_node.restart_count(shop.ns, name, "leader-sidecar") > restarts,
            timeout=30,
        )
        assert poller.stdout is not None
        ready_at = float(poller.stdout.readline())
        new_pid = kube_node.container_pid(kube_node.pod(shop.ns, name), "leader-sidecar")
        FIGURES["sidecar start -> ready in the pod (ms)"] = round(
            (ready_at - proc_start_boottime(new_pid)) * 1000
        )
        time.sleep(2)
        FIGURES["sidecar RSS in the pod (MiB)"] = round(rss_bytes(new_pid) / 2**20, 1)
        now = wait("a settled election", lambda: settled(kube_node, shop), 3 * LEASE_DURATION)
        events = list(watch.events)
    # Nobody else may hold the Lease before the killed leader's term could have lapsed.
    others = [e for e in events if e.at >= t0 and e.holder not in ("", leader)]
    if others:
        assert others[0].at - t0 >= LEASE_DURATION - 1.0, others[0]
    FIGURES["leader after the sidecar was killed"] = "same pod" if now == leader else "another"
    # The app of that pod learnt that its sidecar went away (the stream ended, "unknown"), then
    # the truth again from the restarted one.
    states = app_states(kube_node, shop, name)
    assert states and states[-1]["name"] == now
    assert states[-1]["is_leader"] == (now == name)
    # "unknown" reached the app either as a state on its stream or as the stream's end (the
    # demo app, curl, then exits and the kubelet restarts it on a new stream).
    app_restarted = kube_node.restart_count(shop.ns, name, "app") > app_restarts
    after = states if app_restarted else states[seen_before:]
    FIGURES["app after the sidecar was killed"] = (
        "stream ended, restarted" if app_restarted else "stream went on"
    ) + f"; then saw {[s['state'] for s in after]}"
    assert app_restarted or any(s["state"] == "unknown" for s in after), after


# --------------------------------------------------------------------------- rollouts


def rollout_rule_available() -> bool:
    return any(o.flag == "--rollout-aware" for o in OPTIONS)


@pytest.mark.timeout(900)
@pytest.mark.xfail(
    not rollout_rule_available(),
    reason="issue 12 item 4: the rollout-aware handover (LEADER_SIDECAR_ROLLOUT_AWARE) is not in "
    "the election core yet; until then a rollout of 3 replicas moves leadership 1 to 3 times, "
    "depending on which old pod the ReplicaSet removes first (XPASS when it happened to be 1)",
    strict=False,
)
def test_a_rollout_of_3_replicas_changes_leadership_exactly_once(
    kube_node: Kube, shop: App
) -> None:
    wait("a settled election", lambda: settled(kube_node, shop), 30)
    results = [measure_rollout(kube_node, shop) for _ in range(2)]
    FIGURES["rollout: leadership changes"] = [c for c, _ in results]
    gaps = [g for _, gs in results for g in gs]
    FIGURES["rollout: leaderless per change (ms)"] = [round(g * 1000) for g in gaps]
    assert all(c == 1 for c, _ in results), results
    assert statistics.median(gaps) <= 0.2, gaps


# --------------------------------------------------------------------------- the toggle


def test_leader_election_off_leaves_no_trace_in_the_pod(kube_node: Kube) -> None:
    with kube_node.namespace("plain") as ns:
        values = kube_node.example_values(1)
        values["leaderElection"] = {"enabled": False}
        kube_node.install(RELEASE, ns, values)
        selector = f"app.kubernetes.io/instance={RELEASE}"
        (pod,) = kube_node.wait_ready(ns, selector, 1)
        spec = pod["spec"]
        assert "initContainers" not in spec and [c["name"] for c in spec["containers"]] == ["app"]
        assert "env" not in spec["containers"][0] and "lifecycle" not in spec["containers"][0]
        assert spec["automountServiceAccountToken"] is False and "volumes" not in spec
        assert not any("leader-sidecar" in k for k in pod["metadata"].get("annotations", {}))
        for kind in ("api/v1/namespaces/{ns}/serviceaccounts",
                     "apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
                     "apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
                     "apis/coordination.k8s.io/v1/namespaces/{ns}/leases"):  # fmt: skip
            items = kube_node.api("GET", "/" + kind.format(ns=ns))["items"]
            assert not [i for i in items if "leader-sidecar" in i["metadata"]["name"]], kind
        assert is_ready(pod)
