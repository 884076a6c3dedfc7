"""Operations against the real kube-apiserver: metrics across a handover, Kubernetes Events on
the Pod, the `status` command (three elections, -A, --watch), and structured logs."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.sidecars import (
    LEASE,
    RENEW,
    REPO,
    RETRY,
    Sidecar,
    start_all,
    wait_one_leader,
)
from tests.kube.cluster import Cluster


def kube_args(cluster: Cluster, namespace: str, election: str) -> list[str]:
    return [
        "--kubeconfig",
        str(cluster.kubeconfig),
        "--namespace",
        namespace,
        "--election",
        election,
    ]


# ------------------------------------------------------------------ metrics


def scrape(sidecar: Sidecar) -> dict[str, float]:
    status, text = sidecar.request("GET", "/metrics")
    assert status == 200
    assert isinstance(text, str)
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def test_metrics_change_across_a_handover(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    group = start_all(
        sidecars(name, kube_args(kube_cluster, namespace, "shop")) for name in ("m-a", "m-b")
    )
    old = wait_one_leader(group)
    (new,) = [s for s in group if s is not old]
    # Two renewals after winning, seen as two more PUTs than the acquiring one.
    deadline = time.monotonic() + 10
    while scrape(old)["leader_sidecar_renew_attempts_total"] < 2:
        assert time.monotonic() < deadline, "no renewals"
        old.wait_for(lambda s: True, timeout=RETRY)  # wakes on any change, else after RETRY
    before_old, before_new = scrape(old), scrape(new)
    assert before_old["leader_sidecar_is_leader"] == 1
    assert before_new["leader_sidecar_is_leader"] == 0
    assert before_old['leader_sidecar_leader_transitions_total{direction="acquired"}'] == 1
    assert before_old['leader_sidecar_leader_transitions_total{direction="lost"}'] == 0
    assert before_old["leader_sidecar_lease_transitions"] == 0
    assert before_old["leader_sidecar_seconds_since_last_renew"] < RENEW
    assert "leader_sidecar_seconds_since_last_renew" not in before_new
    assert before_new["leader_sidecar_renew_attempts_total"] == 0
    # The real API server's answers, by verb: a PUT per write, a watch per replica.
    assert before_old['leader_sidecar_api_request_duration_seconds_count{verb="PUT"}'] >= 2
    assert before_new['leader_sidecar_api_request_duration_seconds_count{verb="WATCH"}'] >= 1
    # The test harness follows each replica's SSE stream; nobody is on gRPC.
    assert before_old['leader_sidecar_subscribers{api="sse"}'] == 1
    assert before_old['leader_sidecar_subscribers{api="grpc"}'] == 0
    assert before_old["process_resident_memory_bytes"] > 0

    status, _ = old.request("POST", "/leader/resign")
    assert status == 200
    new.wait_for(lambda s: bool(s.get("is_leader")))
    old.wait_for(lambda s: s.get("name") == new.name)
    after_old, after_new = scrape(old), scrape(new)
    assert after_old["leader_sidecar_is_leader"] == 0
    assert after_old['leader_sidecar_leader_transitions_total{direction="lost"}'] == 1
    assert after_new["leader_sidecar_is_leader"] == 1
    assert after_new['leader_sidecar_leader_transitions_total{direction="acquired"}'] == 1
    assert after_new["leader_sidecar_lease_transitions"] == 1
    assert after_old["leader_sidecar_lease_transitions"] == 1  # the follower saw it too
    # A resign is not a failed renewal.
    assert total(after_old, "leader_sidecar_renew_failures_total") == 0


def test_metrics_alone_on_their_own_address(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    sidecar = sidecars(
        "solo",
        [*kube_args(kube_cluster, namespace, "solo"), "--metrics-address", "127.0.0.1:0"],
    ).wait_started()
    sidecar.wait_for(lambda s: bool(s.get("is_leader")))
    started = next(e for e in sidecar.logs if e.get("event") == "started")
    (address,) = started["metrics"]
    import http.client

    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200
    assert b"leader_sidecar_is_leader 1.0" in response.read()
    connection.request("POST", "/leader/resign")
    response = connection.getresponse()
    response.read()
    assert response.status == 404  # nothing but /metrics there
    connection.close()


# ------------------------------------------------------------------ events


def create_pod(cluster: Cluster, namespace: str, name: str) -> str:
    status, pod = cluster.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/pods",
        {"metadata": {"name": name}, "spec": {"containers": [{"name": "app", "image": "app"}]}},
    )
    assert status == 201, pod
    return str(pod["metadata"]["uid"])


def pod_events(cluster: Cluster, namespace: str, pod: str) -> list[dict[str, Any]]:
    status, body = cluster.api(
        "GET",
        f"/apis/events.k8s.io/v1/namespaces/{namespace}/events?fieldSelector="
        f"regarding.name%3D{pod}",
    )
    assert status == 200, body
    return sorted(body["items"], key=lambda e: e["eventTime"])


def test_events_appear_on_the_pod(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    uids = {pod: create_pod(kube_cluster, namespace, pod) for pod in ("web-0", "web-1")}
    group = start_all(
        sidecars(
            pod,
            [*kube_args(kube_cluster, namespace, "web"), "--events"],
            {"POD_NAME": pod, "POD_NAMESPACE": namespace},
        )
        for pod in uids
    )
    old = wait_one_leader(group)
    (new,) = [s for s in group if s is not old]
    old.terminate()
    assert old.wait_exit() == 0
    new.wait_for(lambda s: bool(s.get("is_leader")))
    # The new leader's Event is sent after it told its app: wait for it to land.
    deadline = time.monotonic() + 10
    while not pod_events(kube_cluster, namespace, new.name):
        assert time.monotonic() < deadline, "no Event on the new leader's Pod"
        new.wait_for(lambda s: True, timeout=0.1)
    old_events = pod_events(kube_cluster, namespace, old.name)
    assert [e["reason"] for e in old_events] == ["BecameLeader", "StoppedLeading"]
    became, stopped = old_events
    assert became["note"] == f"{old.name} became leader"
    assert stopped["note"] == f"{old.name} stopped leading: shutdown"
    for event in old_events:
        assert event["regarding"]["kind"] == "Pod"
        assert event["regarding"]["uid"] == uids[old.name]
        assert event["reportingController"] == "leader-sidecar.io/leader-sidecar"
        assert event["reportingInstance"] == old.name
        assert event["type"] == "Normal"
    (new_event,) = pod_events(kube_cluster, namespace, new.name)
    assert new_event["reason"] == "BecameLeader"
    assert new_event["regarding"]["uid"] == uids[new.name]
    # `kubectl describe pod` reads them through the core API, by the Pod's uid.
    status, core = kube_cluster.api(
        "GET",
        f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.uid%3D"
        f"{uids[old.name]}",
    )
    assert status == 200
    assert {e["reason"] for e in core["items"]} == {"BecameLeader", "StoppedLeading"}


def test_events_without_rbac_are_reported_once_and_harm_nothing(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    rules = [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "watch", "create", "update"],
        }
    ]
    for path, body in (
        (
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
            {"metadata": {"name": "leases-only"}, "rules": rules},
        ),
        (
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "metadata": {"name": "leases-only"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "leases-only",
                },
                "subjects": [
                    {
                        "kind": "User",
                        "name": "sidecar-user",
                        "apiGroup": "rbac.authorization.k8s.io",
                    }
                ],
            },
        ),
    ):
        status, answer = kube_cluster.api("POST", path, body)
        assert status == 201, answer
    create_pod(kube_cluster, namespace, "lonely-0")
    kubeconfig = kube_cluster.kubeconfig_for("sidecar-user")
    sidecar = sidecars(
        "lonely-0",
        [
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            namespace,
            "--election",
            "lonely",
            "--events",
        ],
        {"POD_NAME": "lonely-0", "POD_NAMESPACE": namespace},
    ).wait_started()
    sidecar.wait_for(lambda s: bool(s.get("is_leader")))
    status, _ = sidecar.request("POST", "/leader/resign")  # a second Event that fails too
    assert status == 200
    sidecar.terminate()
    assert sidecar.wait_exit() == 0
    denied = [e for e in sidecar.logs if "events.events.k8s.io" in str(e.get("event"))]
    assert len(denied) == 1, sidecar.log_text()
    assert "RBAC denies 'create' on events.events.k8s.io" in denied[0]["event"]
    assert pod_events(kube_cluster, namespace, "lonely-0") == []


def test_events_on_the_local_backend_are_switched_off_with_a_reason(tmp_path: Path) -> None:
    sidecar = Sidecar(
        "local-0",
        ["--backend", "local", "--local-dir", str(tmp_path), "--election", "x", "--events"],
    )
    try:
        sidecar.wait_started()
        reasons = [e for e in sidecar.logs if "--events" in str(e.get("event"))]
        assert len(reasons) == 1
        assert "kubernetes backend" in reasons[0]["event"]
    finally:
        sidecar.stop()


# ------------------------------------------------------------------ logs


def test_every_log_line_is_structured_and_names_the_election_and_lease(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> None:
    sidecar = sidecars("logger", kube_args(kube_cluster, namespace, "logs")).wait_started()
    sidecar.wait_for(lambda s: bool(s.get("is_leader")))
    sidecar.terminate()
    assert sidecar.wait_exit() == 0
    assert [e for e in sidecar.logs if e.get("level") == "raw"] == []  # every line is JSON
    lease = next(e for e in sidecar.logs if e.get("event") == "started")["lease"]
    assert lease.startswith(f"{namespace}/leader-sidecar-")
    for entry in sidecar.logs:
        assert entry.get("election") == "logs", entry
        assert entry.get("lease") == lease, entry
        assert entry.get("timestamp") and entry.get("level"), entry


# ------------------------------------------------------------------ status


def status(cluster: Cluster, *args: str, kubeconfig: Path | None = None) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADER_SIDECAR_")}
    env["KUBECONFIG"] = str(kubeconfig or cluster.kubeconfig)
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "status", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def three_elections(
    kube_cluster: Cluster, namespace: str, sidecars: Callable[..., Sidecar]
) -> dict[str, list[Sidecar]]:
    """shop (two replicas), billing and mailer (one each); returns them by election."""
    elections = {
        "shop": ["shop-0", "shop-1"],
        "billing": ["billing-0"],
        "mailer": ["mailer-0"],
    }
    made = {
        election: [sidecars(n, kube_args(kube_cluster, namespace, election)) for n in names]
        for election, names in elections.items()
    }
    for group in made.values():
        start_all(group)
        wait_one_leader(group)
    return made


def holders(groups: dict[str, list[Sidecar]]) -> dict[str, str]:
    return {election: wait_one_leader(group).name for election, group in groups.items()}


def test_status_lists_three_elections_with_their_holders(
    kube_cluster: Cluster, namespace: str, three_elections: dict[str, list[Sidecar]]
) -> None:
    expected = holders(three_elections)
    code, out, err = status(kube_cluster, "--namespace", namespace, "-o", "json")
    assert code == 0, err
    items = json.loads(out)["items"]
    assert {i["election"]: i["holder"] for i in items} == expected
    for item in items:
        assert item["namespace"] == namespace
        assert item["lease"].startswith("leader-sidecar-")
        assert item["looks_expired"] is False
        assert item["transitions"] == 0
        assert item["lease_duration_seconds"] == LEASE
        assert 0 <= item["last_renew_seconds_ago"] < LEASE
    assert "clock" in json.loads(out)["note"]

    code, out, err = status(kube_cluster, "-n", namespace)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert re.split(r"\s{2,}", header) == [
        "ELECTION",
        "HOLDER",
        "LAST RENEW",
        "TRANSITIONS",
        "EXPIRED",
        "LEASE",
    ]
    table = {cells[0]: cells for cells in (re.split(r"\s{2,}", row) for row in rows)}
    assert sorted(table) == sorted(expected)  # sorted by election
    assert [row.split()[0] for row in rows] == sorted(expected)
    for election, holder in expected.items():
        cells = table[election]
        assert cells[1] == holder
        assert re.fullmatch(r"\d+s", cells[2])
        assert cells[3:5] == ["0", "no"]

    code, out, err = status(kube_cluster, "--all-namespaces")
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:2] == ["NAMESPACE", "ELECTION"]
    ours = {row.split()[1]: row.split()[2] for row in rows if row.split()[0] == namespace}
    assert ours == expected


def test_status_watch_prints_a_new_holder(
    kube_cluster: Cluster, namespace: str, three_elections: dict[str, list[Sidecar]]
) -> None:
    expected = holders(three_elections)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEADER_SIDECAR_")}
    env["KUBECONFIG"] = str(kube_cluster.kubeconfig)
    watch = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "status", "-n", namespace, "--watch", "-o", "json"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()

    def next_row(timeout: float = 15) -> dict[str, Any]:
        try:
            return dict(json.loads(lines.get(timeout=timeout)))
        except queue.Empty:
            watch.kill()
            raise AssertionError(f"no line from status --watch: {watch.communicate()[1]}") from None

    try:
        initial = [next_row() for _ in range(3)]
        assert {r["election"]: r["holder"] for r in initial} == expected
        assert {r["type"] for r in initial} == {"ADDED"}
        shop = three_elections["shop"]
        old = next(s for s in shop if s.name == expected["shop"])
        (new,) = [s for s in shop if s is not old]
        code, _ = old.request("POST", "/leader/resign")
        assert code == 200
        # Released (no holder), then taken by the other replica; renewals print nothing.
        while True:
            row = next_row()
            assert row["election"] == "shop", row
            if row["holder"] == new.name:
                break
            assert row["holder"] is None, row
        assert row["type"] == "MODIFIED"
        assert row["transitions"] == 1
    finally:
        watch.terminate()
        watch.wait(10)
    assert watch.returncode == 0


def test_status_explains_what_is_wrong(kube_cluster: Cluster, namespace: str) -> None:
    code, out, err = status(kube_cluster, "-n", namespace, "-A")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "not allowed with argument" in err
    code, _, err = status(kube_cluster, "-o", "yaml")
    assert code == 2 and "invalid choice: 'yaml'" in err and err.count("\n") == 1
    code, _, err = status(kube_cluster, "-n", "Not_A_Namespace")
    assert code == 2 and "not a valid namespace name" in err
    code, _, err = status(kube_cluster, "--kubeconfig", "/nonexistent")
    assert code == 2 and "--kubeconfig /nonexistent: no such file" in err
    code, out, err = status(kube_cluster, "-n", namespace)
    assert (code, out) == (0, "")
    assert f"No leader-sidecar elections found in namespace '{namespace}'" in err
    denied = kube_cluster.kubeconfig_for("noaccess")
    code, _, err = status(kube_cluster, "-n", namespace, kubeconfig=denied)
    assert code == 1
    assert err.count("\n") == 1
    assert "RBAC denies 'list' on leases.coordination.k8s.io" in err
