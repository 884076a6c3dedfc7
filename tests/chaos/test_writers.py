"""Other writers: a hostile client hammering the Lease (409 storms) or taking it over, and the
service-account token replaced under a running in-cluster fleet."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.fleet import LEASE, RENEW, Fleet, poll
from tests.chaos.recorder import assert_safe
from tests.kube.cluster import Cluster


class HostileWriter(threading.Thread):
    """Reads the Lease and writes it back with a new annotation, as fast as it can, so that
    every other writer's resourceVersion goes stale (HTTP 409 for them)."""

    def __init__(self, cluster: Cluster, path: str, seconds: float) -> None:
        super().__init__(daemon=True)
        self.cluster, self.path, self.seconds = cluster, path, seconds
        self.statuses: Counter[int] = Counter()

    def run(self) -> None:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.cluster.port, timeout=10, context=self.cluster.ssl_context()
        )
        headers = {
            "Authorization": f"Bearer {self.cluster.admin_token}",
            "Content-Type": "application/json",
        }
        end = time.monotonic() + self.seconds
        n = 0
        try:
            while time.monotonic() < end and n < 20_000:
                n += 1
                conn.request("GET", self.path, headers=headers)
                lease = json.loads(conn.getresponse().read())
                annotations = lease["metadata"].setdefault("annotations", {})
                annotations["chaos.leader-sidecar.io/hostile"] = str(n)
                conn.request("PUT", self.path, json.dumps(lease), headers)
                response = conn.getresponse()
                response.read()
                self.statuses[response.status] += 1
        finally:
            conn.close()


def _lease_path(fleet: Fleet) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{fleet.namespace}/leases/{fleet.lease_name()}"


@pytest.mark.timeout(180)
def test_a_hostile_writer_causes_409_storms(fleet: Fleet) -> None:
    fleet.start(3)
    for _ in range(2):
        leader = fleet.wait_leader()
        writer = HostileWriter(fleet.cluster, _lease_path(fleet), seconds=2 * LEASE)
        writer.start()
        writer.join()
        # The other writers lost many races; the record stayed consistent all along.
        assert writer.statuses[200] > 50, writer.statuses
        fleet.wait_leader(timeout=LEASE + RENEW + 10)
        # And a graceful handover afterwards still works.
        leader.terminate()
        leader.wait_exit()
        fleet.replace(leader)
    lost = [e for r in fleet.replicas for e in r.logs if e.get("event") == "lost"]
    print(f"\n[chaos] writer statuses {dict(writer.statuses)}; leaderships lost: {lost}")
    assert_safe(fleet.members)


def test_a_foreign_holder_takes_the_lease(fleet: Fleet) -> None:
    """Someone else (an operator, a client-go elector) writes itself in as holder: the leader
    steps down at once, and nobody leads until that holder's lease would have lapsed."""
    fleet.start(3)
    for round_ in range(2):
        leader = fleet.wait_leader()
        status, lease = fleet.cluster.api("GET", _lease_path(fleet))
        assert status == 200, lease
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease["spec"].update(
            holderIdentity=f"intruder-{round_}",
            leaseDurationSeconds=int(LEASE),
            acquireTime=now,
            renewTime=now,
            leaseTransitions=lease["spec"]["leaseTransitions"] + 1,
        )
        written = time.monotonic()
        status, body = fleet.cluster.api("PUT", _lease_path(fleet), lease)
        assert status == 200, body
        written = (written + time.monotonic()) / 2
        leader.wait_for(lambda s: not s.get("is_leader"), timeout=5)
        assert leader.intervals()[-1].end - written < 0.5
        new = fleet.wait_leader(timeout=LEASE + 10)
        # Every replica waited out the intruder's lease from when it saw the write.
        assert new.intervals()[-1].start - written >= LEASE - 0.1
        assert fleet.lease()["spec"]["leaseTransitions"] == lease["spec"]["leaseTransitions"] + 1
    assert_safe(fleet.members)


# ------------------------------------------------------------------------ token rotation

LEASE_RULE = {
    "apiGroups": ["coordination.k8s.io"],
    "resources": ["leases"],
    "verbs": ["get", "watch", "create", "update"],
}


def _service_account(cluster: Cluster, namespace: str, name: str) -> str:
    """A ServiceAccount allowed to run the election; a fresh token for it."""
    for path, body in (
        (f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}}),
        (
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "metadata": {"name": name},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "election",
                },
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        ),
    ):
        status, answer = cluster.api("POST", path, body)
        assert status == 201, answer
    return cluster.create_token(namespace, name)


def _project(directory: Path, files: dict[str, str], generation: int) -> None:
    """Write the projected volume as kubelet does: a new timestamped directory, then an atomic
    swap of the `..data` symlink that `token`, `ca.crt` and `namespace` point through."""
    target = directory / f"..{generation}_{time.time_ns()}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    link = directory / "..data_tmp"
    link.symlink_to(target.name)
    os.replace(link, directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


@pytest.mark.timeout(180)
def test_the_token_is_rotated_under_a_running_fleet(fleet: Fleet, tmp_path: Path) -> None:
    cluster, namespace = fleet.cluster, fleet.namespace
    status, body = cluster.api(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
        {"metadata": {"name": "election"}, "rules": [LEASE_RULE]},
    )
    assert status == 201, body
    secrets = tmp_path / "serviceaccount"
    secrets.mkdir()
    files = {"ca.crt": cluster.ca_file.read_text(), "namespace": namespace}
    _project(secrets, {**files, "token": _service_account(cluster, namespace, "sa-0")}, 0)
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(cluster.port)}
    fleet.start(
        3, args=["--service-account-dir", str(secrets), "--election", fleet.election], env=env
    )
    for generation in range(1, 4):
        leader = fleet.wait_leader()
        token = _service_account(cluster, namespace, f"sa-{generation}")
        _project(secrets, {**files, "token": token}, generation)
        # The old token is worthless from now on.
        old = f"/api/v1/namespaces/{namespace}/serviceaccounts/sa-{generation - 1}"
        status, body = cluster.api("DELETE", old)
        assert status == 200, body
        _wait_renewals(fleet, 3)
        assert leader.leading and fleet.lease()["spec"]["holderIdentity"] == leader.name
        if generation % 2:
            # A follower must win with the new token too.
            leader.terminate()
            leader.wait_exit()
            fleet.wait_leader(among=[r for r in fleet.live()])
            fleet.replace(leader)
    for replica in fleet.replicas:
        errors = [e for e in replica.logs if e.get("event") == "backend error"]
        assert not errors, errors
        if replica.proc.poll() is None:  # never interrupted: one tenure at most
            assert len(replica.intervals()) <= 1, replica.intervals()
    assert_safe(fleet.members)


def _wait_renewals(fleet: Fleet, count: int) -> None:
    seen: list[Any] = []

    def renewed() -> bool:
        renew = fleet.lease()["spec"]["renewTime"]
        if not seen or seen[-1] != renew:
            seen.append(renew)
        return len(seen) > count

    poll(renewed, count * RENEW + 5, f"{count} renewals")
