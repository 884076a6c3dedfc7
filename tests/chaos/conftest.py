"""The chaos suite runs on the e2e suite's real API server fixtures (see tests/e2e/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.fleet import Fleet
from tests.chaos.gobuild import build
from tests.e2e import conftest as e2e
from tests.e2e.conftest import kube_cluster, namespace
from tests.kube.cluster import Cluster

__all__ = ["kube_cluster", "namespace"]


def pytest_collection_finish(session: pytest.Session) -> None:
    # As the e2e conftest does: build before the first test, outside any test's timeout.
    chaos = [i for i in session.items if "tests/chaos/" in i.nodeid]
    if chaos:
        e2e.pytest_collection_finish(session)
        for program in ("toxiproxy", "clientgo"):
            build(program)


@pytest.fixture
def fleet(kube_cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Fleet]:
    """Replicas on one Lease in a fresh namespace; the no-double-leader check runs after every
    test, over every replica that ever ran (tests also check on their own)."""
    fleet = Fleet(kube_cluster, namespace, tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop_all()
    report = fleet.check()
    print(f"\n[chaos] {report.summary()}")
    if not fleet.checked_in_test:
        assert not report.violations, "\n".join(report.violations)
