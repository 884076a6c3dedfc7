"""The Helm charts: lint, render, server-side dry-run and RBAC, on the real kube-apiserver.

charts/leader-sidecar is a library chart; charts/example-app includes it when
`leaderElection.enabled` is true. helm is built from the Go module proxy (tests/kube/helm.py).
The RBAC tests apply the chart's own ServiceAccount/Role/RoleBinding, mint a token for that
ServiceAccount and run real sidecars with it, with the arguments the chart renders.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.naming import lease_name
from tests.e2e.sidecars import REPO, Sidecar, assert_never_two_leaders, start_all, wait_one_leader
from tests.kube import helm
from tests.kube.cluster import Cluster, free_port

Manifest = dict[str, Any]
ON = {"leaderElection": {"enabled": True}}
EVERYTHING = {
    "leaderElection": {
        "enabled": True,
        "discovery": True,
        "labelPod": True,
        "events": True,
        "probes": {"readiness": {"enabled": True}},
    }
}
VARIANTS: dict[str, dict[str, Any]] = {
    "off": {},
    "on": ON,
    "on-plain-container": {
        "leaderElection": {
            "enabled": True,
            "native": False,
            "probes": {"readiness": {"enabled": True}},
        }
    },
    "on-every-option": EVERYTHING,
    "on-api-token": {
        "leaderElection": {"enabled": True, "apiToken": {"secretName": "shop-api", "reads": True}}
    },
    "on-shards": {"leaderElection": {"enabled": True, "shards": 4}},
    "on-shared-token-no-grpc": {
        "leaderElection": {
            "enabled": True,
            "serviceAccount": {"tokenOnlyInSidecar": False},
            "grpc": {"enabled": False},
            "probes": {"enabled": False},
            "tmpVolume": False,
        }
    },
}
# Where each kind is created (namespaced).
PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}
LEASE_VERBS = ("get", "watch", "create", "update")


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def charts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of charts/ with example-app's dependency on the library vendored."""
    helm.build()  # cached; .ci/run builds it before the tests (a cold build takes minutes)
    return helm.prepare_charts(tmp_path_factory.mktemp("charts"))


@pytest.fixture
def render(charts: Path, tmp_path: Path) -> Callable[..., list[Manifest]]:
    def render(
        values: dict[str, Any], release: str = "shop", namespace: str = "default"
    ) -> list[Manifest]:
        _, docs = helm.template(
            charts / "example-app", release, namespace, values, home=tmp_path / "helm"
        )
        return docs

    return render


@pytest.fixture
def sidecars() -> Iterator[Callable[..., Sidecar]]:
    made: list[Sidecar] = []

    def make(name: str, args: list[str], env: dict[str, str] | None = None) -> Sidecar:
        sidecar = Sidecar(name, args, env)
        made.append(sidecar)
        return sidecar

    yield make
    for sidecar in made:
        sidecar.stop()
    assert_never_two_leaders(made)


# -------------------------------------------------------------------------------- helpers


def by_kind(docs: list[Manifest]) -> dict[str, Manifest]:
    kinds = {doc["kind"]: doc for doc in docs}
    assert len(kinds) == len(docs), [d["kind"] for d in docs]
    return kinds


def pod_spec(docs: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(docs)["Deployment"]["spec"]["template"]["spec"]
    return spec


def sidecar_container(docs: list[Manifest]) -> dict[str, Any]:
    spec = pod_spec(docs)
    found: list[dict[str, Any]] = [
        c
        for c in [*spec.get("initContainers", []), *spec["containers"]]
        if c["name"] == "leader-sidecar"
    ]
    assert len(found) == 1, spec
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def lease_rules(role: Manifest) -> list[dict[str, Any]]:
    return [r for r in role["rules"] if r["resources"] == ["leases"]]


def local_args(container: dict[str, Any]) -> list[str]:
    """The chart's arguments for a sidecar run here: addresses and log format are the test's."""
    args: list[str] = container["args"]
    assert args[0] == "run"
    mine = ("--http-address=", "--grpc-address=", "--log-format=")
    return [a for a in args[1:] if not a.startswith(mine)]


def run_probe(probe: dict[str, Any], port: int) -> subprocess.CompletedProcess[str]:
    """Run the chart's exec probe as the kubelet would, against a local sidecar's port."""
    command = list(probe["exec"]["command"])
    assert command[0] == "python"  # on PATH in the image (the venv's bin comes first)
    command[0] = sys.executable
    assert command[5] == "4040"
    command[5] = str(port)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=probe["timeoutSeconds"] + 5
    )


def wait_log(
    sidecar: Sidecar, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """The first log entry of `sidecar` that satisfies `predicate`, once it was written."""

    def found() -> dict[str, Any] | None:
        return next((e for e in sidecar.logs if predicate(e)), None)

    with sidecar._changed:
        sidecar._changed.wait_for(lambda: found() is not None, timeout)
        entry = found()
    assert entry is not None, sidecar.log_text()
    return entry


def create(cluster: Cluster, namespace: str, doc: Manifest, dry_run: bool = False) -> Manifest:
    path = PATHS[doc["kind"]].format(ns=namespace)
    if dry_run:
        path += "?dryRun=All&fieldValidation=Strict"
    status, body = cluster.api("POST", path, doc)
    assert status == 201, f"{doc['kind']} {doc['metadata']['name']}: {status} {body}"
    return dict(body)


def can(cluster: Cluster, token: str, namespace: str, verb: str, resource: str, **kw: str) -> bool:
    """A SelfSubjectAccessReview as the token's user."""
    attributes = {"namespace": namespace, "verb": verb, "resource": resource, **kw}
    status, body = cluster.api(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        {"spec": {"resourceAttributes": attributes}},
        token,
    )
    assert status == 201, body
    return bool(body["status"]["allowed"])


def apply_rbac(cluster: Cluster, namespace: str, docs: list[Manifest]) -> str:
    """Create the chart's ServiceAccount, Role and RoleBinding; a token for the account."""
    kinds = by_kind(docs)
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        create(cluster, namespace, kinds[kind])
    return cluster.create_token(namespace, kinds["ServiceAccount"]["metadata"]["name"])


# ------------------------------------------------------------------- lint and render (helm)


def test_both_charts_lint_clean_with_the_toggle_on_and_off(charts: Path, tmp_path: Path) -> None:
    home = tmp_path / "helm"
    helm.run("lint", "--strict", charts / "leader-sidecar", home=home)
    for name, values in VARIANTS.items():
        values_file = tmp_path / f"{name}.json"
        values_file.write_text(json.dumps(values))
        result = helm.run(
            "lint", "--strict", charts / "example-app", "--values", values_file, home=home
        )
        assert "0 chart(s) failed" in result.stdout, (name, result.stdout)


def test_the_toggle_off_renders_no_trace_of_the_sidecar(charts: Path, tmp_path: Path) -> None:
    text, docs = helm.template(
        charts / "example-app", "shop", "default", {}, home=tmp_path / "helm"
    )
    assert [d["kind"] for d in docs] == ["Deployment"]
    assert "leader" not in text.lower(), text
    spec = pod_spec(docs)
    assert "initContainers" not in spec and "volumes" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert "env" not in spec["containers"][0]
    assert spec["automountServiceAccountToken"] is False


def test_the_toggle_on_adds_a_native_sidecar_and_its_rbac(
    render: Callable[..., list[Manifest]],
) -> None:
    docs = render(ON, namespace="team-a")
    kinds = by_kind(docs)
    assert set(kinds) == {"Deployment", "ServiceAccount", "Role", "RoleBinding"}
    spec = pod_spec(docs)
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == "leader-sidecar"
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: before the app, after it
    assert [c["name"] for c in spec["containers"]] == ["app"]

    # The app learns where the APIs are; they listen on loopback only.
    assert env_of(spec["containers"][0]) == {
        "LEADER_SIDECAR_HTTP": "http://127.0.0.1:4040",
        "LEADER_SIDECAR_GRPC": "127.0.0.1:4041",
    }
    args = sidecar["args"]
    assert args[:2] == ["run", "--backend=kubernetes"]
    assert "--election=shop-example-app" in args
    assert "--http-address=127.0.0.1:4040" in args and "--grpc-address=127.0.0.1:4041" in args
    assert "ports" not in sidecar  # nothing listens on the pod IP
    env = env_of(sidecar)
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}  # for --events
    # Rollout awareness: the pod's revision, and the switch (chart value rolloutAware, on).
    assert env["POD_TEMPLATE_HASH"] == {
        "fieldRef": {"fieldPath": "metadata.labels['pod-template-hash']"}
    }
    assert env["LEADER_SIDECAR_ROLLOUT_AWARE"] == "true"

    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sidecar["resources"]["requests"] and "cpu" not in sidecar["resources"]["limits"]

    # Exec probes on loopback; readiness is off (/readyz stays 200 once startup saw it).
    probes = {k: p for k in ("startup", "readiness", "liveness") if (p := sidecar.get(f"{k}Probe"))}
    assert {k: p["exec"]["command"][6] for k, p in probes.items()} == {
        "startup": "/readyz",
        "liveness": "/healthz",
    }

    # Only the sidecar holds the ServiceAccount's token.
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert mounts["leader-sidecar-token"] == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert "volumeMounts" not in spec["containers"][0]

    # Least privilege: the one Lease by name, `create` (which RBAC cannot restrict by name).
    lease = lease_name("leader-sidecar", "shop-example-app")
    assert kinds["Role"]["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "watch", "update"],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        # rolloutAware (on by default): the Deployment's pods and this Pod's ReplicaSets.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": ["get"]},
    ]
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": kinds["ServiceAccount"]["metadata"]["name"],
            "namespace": "team-a",
        }
    ]


def test_the_probe_says_why_when_nothing_answers(render: Callable[..., list[Manifest]]) -> None:
    probe = sidecar_container(render(ON))["livenessProbe"]
    result = run_probe(probe, free_port())  # nothing listens there
    assert result.returncode == 1
    assert result.stderr.strip() == "/healthz: ConnectionRefusedError(111, 'Connection refused')"


def test_the_plain_container_form_for_older_clusters(
    render: Callable[..., list[Manifest]],
) -> None:
    spec = pod_spec(render({"leaderElection": {"enabled": True, "native": False}}))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "leader-sidecar"]
    assert "restartPolicy" not in spec["containers"][1]


def test_each_option_adds_only_its_own_permission(render: Callable[..., list[Manifest]]) -> None:
    def rules(values: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...]]]:
        role = by_kind(render({"leaderElection": {"enabled": True, **values}}))["Role"]
        return [
            (r["apiGroups"][0], r["resources"][0], tuple(r["verbs"]))
            for r in role["rules"]
            if r["resources"] != ["leases"]
        ]

    rollout = [("", "pods", ("get", "list", "watch")), ("apps", "replicasets", ("get",))]
    assert rules({}) == rollout  # rolloutAware is on by default
    off: dict[str, Any] = {"rolloutAware": False}
    assert rules(off) == []
    assert rules({**off, "discovery": True}) == [
        ("", "pods", ("get",)),
        ("apps", "replicasets", ("get",)),
    ]
    assert rules({**off, "labelPod": True}) == [("", "pods", ("list", "patch"))]
    assert rules({**off, "events": True}) == [("events.k8s.io", "events", ("create",))]
    assert rules({**off, "metrics": {"enabled": True}}) == []

    docs = render(EVERYTHING)
    args = sidecar_container(docs)["args"]
    assert not any(a.startswith("--election") for a in args)  # discovered from the pod
    assert "--label-pod" in args and "--events" in args
    assert not any(a.startswith("--metrics-address") for a in args)
    container = sidecar_container(
        render({"leaderElection": {"enabled": True, "metrics": {"enabled": True}}})
    )
    assert "--metrics-address=0.0.0.0:9102" in container["args"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9102, "protocol": "TCP"}]
    open_role = by_kind(
        render({"leaderElection": {"enabled": True, "rbac": {"restrictToLease": False}}})
    )
    assert all("resourceNames" not in r for r in open_role["Role"]["rules"])

    probes = {"readiness": {"enabled": True}, "liveness": {"enabled": False}}
    container = sidecar_container(render({"leaderElection": {"enabled": True, "probes": probes}}))
    assert "readinessProbe" in container and "livenessProbe" not in container
    assert container["readinessProbe"]["periodSeconds"] == 30

    docs = render({"leaderElection": {"enabled": True, "grpc": {"enabled": False}}})
    assert "--grpc-address=off" in sidecar_container(docs)["args"]
    assert "LEADER_SIDECAR_GRPC" not in env_of(pod_spec(docs)["containers"][0])


@pytest.mark.parametrize(
    ("values", "release", "prefix", "election"),
    [
        ({}, "shop", "leader-sidecar", "shop-example-app"),
        ({}, "example-app", "leader-sidecar", "example-app"),
        ({"fullnameOverride": "c" * 63}, "x", "leader-sidecar", "c" * 63),
        (
            {"leaderElection": {"election": "Zahlungsverkehr für Österreich"}},
            "x",
            "leader-sidecar",
            "Zahlungsverkehr für Österreich",
        ),
        (
            {"leaderElection": {"leasePrefix": "team-a.elections"}},
            "pay",
            "team-a.elections",
            "pay-example-app",
        ),
    ],
)
def test_the_chart_computes_the_lease_name_the_sidecar_derives(
    render: Callable[..., list[Manifest]],
    values: dict[str, Any],
    release: str,
    prefix: str,
    election: str,
) -> None:
    values = copy.deepcopy(values)
    values.setdefault("leaderElection", {})["enabled"] = True
    docs = render(values, release=release)
    expected = lease_name(prefix, election)
    (rule, _) = lease_rules(by_kind(docs)["Role"])
    assert rule["resourceNames"] == [expected]
    annotations = by_kind(docs)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["leader-sidecar.io/lease"] == expected
    assert annotations["leader-sidecar.io/election"] == election
    assert f"--election={election}" in sidecar_container(docs)["args"]


def test_an_explicit_lease_name_is_passed_and_granted(
    render: Callable[..., list[Manifest]],
) -> None:
    docs = render({"leaderElection": {"enabled": True, "leaseName": "payments-leader"}})
    assert "--lease-name=payments-leader" in sidecar_container(docs)["args"]
    assert lease_rules(by_kind(docs)["Role"])[0]["resourceNames"] == ["payments-leader"]


def test_the_image_tag_follows_the_package_version(charts: Path) -> None:
    import yaml

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    library = charts / "leader-sidecar"
    assert yaml.safe_load((library / "values.yaml").read_text())["image"]["tag"] == version
    assert yaml.safe_load((library / "Chart.yaml").read_text())["appVersion"] == version


# ------------------------------------------------------------ the real API server (dry-run)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_manifest_passes_a_server_side_dry_run(
    kube_cluster: Cluster,
    namespace: str,
    render: Callable[..., list[Manifest]],
    variant: str,
) -> None:
    docs = render(VARIANTS[variant], namespace=namespace)
    for doc in docs:
        answer = create(kube_cluster, namespace, doc, dry_run=True)
        assert answer["kind"] == doc["kind"]
    if variant == "on":
        (sidecar,) = answer["spec"]["template"]["spec"]["initContainers"]
        assert sidecar["restartPolicy"] == "Always"  # kept by the API server (>= 1.29)
    # A dry run stores nothing.
    status, _ = kube_cluster.api(
        "GET", f"{PATHS['Deployment'].format(ns=namespace)}/shop-example-app"
    )
    assert status == 404


# ----------------------------------------------------------------- RBAC, end to end (real)


def test_the_charts_rbac_runs_an_election_and_grants_no_more(
    kube_cluster: Cluster,
    namespace: str,
    render: Callable[..., list[Manifest]],
    sidecars: Callable[..., Sidecar],
) -> None:
    docs = render(ON, namespace=namespace)
    token = apply_rbac(kube_cluster, namespace, docs)
    kubeconfig = str(kube_cluster.kubeconfig_for(token))
    container = sidecar_container(docs)
    args = [*local_args(container), "--kubeconfig", kubeconfig]
    group = start_all(
        sidecars(f"shop-{i}", args, {"POD_NAME": f"shop-{i}", "POD_NAMESPACE": namespace})
        for i in range(3)
    )
    leader = wait_one_leader(group)

    # The Lease the sidecars use is the one the chart computed and granted.
    lease = leader.leader()["lease"]
    (rule, _) = lease_rules(by_kind(docs)["Role"])
    assert (
        lease["name"]
        == rule["resourceNames"][0]
        == lease_name("leader-sidecar", "shop-example-app")
    )
    assert lease["namespace"] == namespace
    status, body = kube_cluster.api(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{lease['name']}"
    )
    assert status == 200 and body["spec"]["holderIdentity"] == leader.name

    # The chart's probes, run as the kubelet would, pass on every replica.
    for sidecar in group:
        for kind in ("startup", "liveness"):
            result = run_probe(container[f"{kind}Probe"], sidecar.port)
            assert result.returncode == 0, (kind, result.stdout, result.stderr)
            assert result.stdout.startswith("200 "), result.stdout

    # Handover: the followers watch the Lease by name (a fieldSelector RBAC matches against
    # resourceNames) and one takes over at once when the leader releases it.
    leader.terminate()
    assert leader.wait_exit() == 0
    successor = wait_one_leader([s for s in group if s is not leader], timeout=10)
    assert successor is not leader
    for sidecar in group:
        assert "backend error" not in sidecar.log_events(), sidecar.log_text()

    # No more than that: nothing else in the namespace, nothing cluster-wide.
    other = {"group": "coordination.k8s.io"}
    assert can(kube_cluster, token, namespace, "create", "leases", **other)
    for verb in ("get", "watch", "update"):
        assert can(kube_cluster, token, namespace, verb, "leases", name=lease["name"], **other)
        assert not can(
            kube_cluster, token, namespace, verb, "leases", name="kube-scheduler", **other
        )
    for verb in ("list", "delete", "patch", "deletecollection"):
        assert not can(kube_cluster, token, namespace, verb, "leases", name=lease["name"], **other)
    # rolloutAware (on by default) reads pods and ReplicaSets, and changes neither.
    for verb in ("get", "list", "watch"):
        assert can(kube_cluster, token, namespace, verb, "pods")
    for verb in ("patch", "update", "delete", "create"):
        assert not can(kube_cluster, token, namespace, verb, "pods")
    assert can(kube_cluster, token, namespace, "get", "replicasets", group="apps")
    assert not can(kube_cluster, token, namespace, "list", "replicasets", group="apps")
    assert not can(kube_cluster, token, namespace, "get", "secrets")
    assert not can(kube_cluster, token, "kube-system", "get", "leases", name=lease["name"], **other)


def test_the_shards_value_sets_the_flag_and_its_rbac_runs_the_shards(
    kube_cluster: Cluster,
    namespace: str,
    render: Callable[..., list[Manifest]],
    sidecars: Callable[..., Sidecar],
) -> None:
    docs = render({"leaderElection": {"enabled": True, "shards": 4}}, namespace=namespace)
    container = sidecar_container(docs)
    assert "--shards=4" in container["args"]
    app = pod_spec(docs)["containers"][0]
    assert app["command"][-1] == "$(LEADER_SIDECAR_HTTP)/shards?watch=true"
    lease = lease_name("leader-sidecar", "shop-example-app")
    (rule, *_) = lease_rules(by_kind(docs)["Role"])
    assert rule["resourceNames"] == [f"{lease}-{i}" for i in range(4)]
    token = apply_rbac(kube_cluster, namespace, docs)
    args = [*local_args(container), "--kubeconfig", str(kube_cluster.kubeconfig_for(token))]
    group = start_all(
        sidecars(f"shop-{i}", args, {"POD_NAME": f"shop-{i}", "POD_NAMESPACE": namespace})
        for i in range(2)
    )

    def owned() -> list[list[int]]:
        return [[o["shard"] for o in s.request("GET", "/shards")[1]["owned"]] for s in group]

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sorted(len(o) for o in owned()) == [2, 2]:
            break
        time.sleep(0.1)
    mine = owned()
    assert sorted(shard for o in mine for shard in o) == [0, 1, 2, 3], mine
    for sidecar in group:
        events = sidecar.log_events()
        assert "backend error" not in events and "member record failed" not in events, (
            sidecar.log_text()
        )
        assert "member watch failed" not in events, sidecar.log_text()
    other = {"group": "coordination.k8s.io"}
    for verb in ("get", "watch", "update"):
        assert can(kube_cluster, token, namespace, verb, "leases", name=f"{lease}-3", **other)
    assert not can(kube_cluster, token, namespace, "patch", "leases", name=f"{lease}-3", **other)
    assert not can(kube_cluster, token, "kube-system", "list", "leases", **other)


def test_label_pod_and_events_work_with_the_charts_rbac(
    kube_cluster: Cluster,
    namespace: str,
    render: Callable[..., list[Manifest]],
    sidecars: Callable[..., Sidecar],
) -> None:
    values = {"leaderElection": {"enabled": True, "labelPod": True, "events": True}}
    docs = render(values, namespace=namespace)
    token = apply_rbac(kube_cluster, namespace, docs)
    pods = f"/api/v1/namespaces/{namespace}/pods"
    uids = {}
    for i in range(2):  # the pods exist (no kubelet runs them: the sidecars run here)
        status, pod = kube_cluster.api(
            "POST",
            pods,
            {
                "metadata": {"name": f"shop-{i}"},
                "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
            },
        )
        assert status == 201, pod
        uids[f"shop-{i}"] = pod["metadata"]["uid"]
    kubeconfig = str(kube_cluster.kubeconfig_for(token))
    args = [*local_args(sidecar_container(docs)), "--kubeconfig", kubeconfig, "--log-level=debug"]
    group = start_all(
        sidecars(name, args, {"POD_NAME": name, "POD_NAMESPACE": namespace, "POD_UID": uid})
        for name, uid in uids.items()
    )
    leader = wait_one_leader(group)
    # The label is set before the app hears that it leads.
    status, pod = kube_cluster.api("GET", f"{pods}/{leader.name}")
    assert pod["metadata"]["labels"]["leader-sidecar.io/role"] == "leader"
    # Events are sent in the background, after the app was told: wait for the sidecar's word.
    wait_log(leader, lambda e: e.get("event") == "Kubernetes Event sent")
    _, found = kube_cluster.api("GET", f"/apis/events.k8s.io/v1/namespaces/{namespace}/events")
    became = [e for e in found["items"] if e["reason"] == "BecameLeader"]
    assert [e["regarding"]["uid"] for e in became] == [uids[leader.name]], found
    for sidecar in group:
        text = json.dumps(sidecar.logs)
        assert "RBAC denies" not in text and "cannot send" not in text, sidecar.log_text()


def _lease(namespace: str, name: str, holder: str) -> Manifest:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 3600,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        },
    }


# What has to exist for the sidecar to reach each verb: `get` comes first; `create` when there
# is no Lease; `update` to take a released Lease; `watch` as a follower of a held one.
SETUP = {"get": None, "create": None, "update": "", "watch": "someone-else"}


@pytest.mark.parametrize("verb", LEASE_VERBS)
def test_a_role_missing_one_verb_fails_naming_it(
    kube_cluster: Cluster,
    namespace: str,
    render: Callable[..., list[Manifest]],
    sidecars: Callable[..., Sidecar],
    verb: str,
) -> None:
    docs = render(ON, namespace=namespace)
    role = by_kind(docs)["Role"]
    for rule in lease_rules(role):
        rule["verbs"] = [v for v in rule["verbs"] if v != verb]
    role["rules"] = [r for r in role["rules"] if r["verbs"]]
    token = apply_rbac(kube_cluster, namespace, docs)
    name = lease_name("leader-sidecar", "shop-example-app")
    holder = SETUP[verb]
    if holder is not None:
        status, body = kube_cluster.api(
            "POST",
            f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
            _lease(namespace, name, holder),
        )
        assert status == 201, body

    container = sidecar_container(docs)
    args = [*local_args(container), "--kubeconfig", str(kube_cluster.kubeconfig_for(token))]
    sidecar = sidecars("shop-0", args, {"POD_NAMESPACE": namespace}).wait_started()
    sidecar.wait_for(lambda s: bool(s.get("error")), timeout=15)
    expected = f"RBAC denies '{verb}' on leases.coordination.k8s.io in namespace '{namespace}'"
    # What the app was told.
    errors = [s["error"] for _, s in sidecar.events if s.get("error")]
    assert errors and all(e.startswith(expected) for e in errors), errors
    assert not any(s.get("is_leader") for _, s in sidecar.events)
    logged = wait_log(sidecar, lambda e: e.get("event") in ("backend error", "watch error"))[
        "error"
    ]
    assert logged.startswith(expected), sidecar.log_text()
    print(f"\n{verb}: {logged}")  # shown with -s: the line an operator reads
    if verb == "get":  # nothing observed: not ready, and the probe says why
        result = run_probe(container["startupProbe"], sidecar.port)
        assert result.returncode == 1
        assert result.stdout.startswith("503 ") and expected in result.stdout, result.stdout
