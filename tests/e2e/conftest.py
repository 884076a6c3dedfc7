"""Fixtures for tests against a real kube-apiserver + etcd (see tests/kube/cluster.py)."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.sidecars import TIMINGS, Sidecar, assert_never_two_leaders_per_election
from tests.kube.cluster import Cluster, build

_build_errors: list[Exception] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build before the first test runs: a cold build takes minutes and would otherwise
    # count against that test's timeout (pytest-timeout covers fixture setup too).
    if any("kube_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        try:
            build()
        except Exception as e:  # reported by the fixture, as an error of each test
            _build_errors.append(e)


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One real cluster per test session; tests isolate themselves by namespace."""
    if _build_errors:
        raise _build_errors[0]
    with Cluster(tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster


@pytest.fixture
def namespace(kube_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, removed afterwards."""
    kube_cluster.ensure_running()  # an earlier outage test may have failed half-way
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    status, body = kube_cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert status == 201, body
    yield name
    kube_cluster.ensure_running()
    status, body = kube_cluster.api("DELETE", f"/api/v1/namespaces/{name}")
    assert status in (200, 202, 404), body
    # No controller-manager runs, so nothing would empty the namespace and drop its
    # `kubernetes` finalizer: drop it here so that the namespace is really gone.
    status, body = kube_cluster.api(
        "PUT",
        f"/api/v1/namespaces/{name}/finalize",
        {"metadata": {"name": name}, "spec": {"finalizers": []}},
    )
    assert status in (200, 404), body


@pytest.fixture
def sidecars() -> Iterator[Callable[..., Sidecar]]:
    """Start `leader-sidecar run` processes with the fast timings; stop them afterwards and
    check that no election ever had two leaders."""
    made: list[Sidecar] = []

    def make(name: str, args: list[str], env: dict[str, str] | None = None) -> Sidecar:
        sidecar = Sidecar(name, [*TIMINGS, *args], env)
        made.append(sidecar)
        return sidecar

    yield make
    for sidecar in made:
        sidecar.stop()
    assert_never_two_leaders_per_election(made)
