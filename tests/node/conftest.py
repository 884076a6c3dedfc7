"""Fixtures for the pod-level tests on a one-node cluster (tests/kube/node.py).

The node is built once per session (cold: binaries and images take a while, cached afterwards)
and started per test module; one node runs on a machine at a time, so a run waits for another
run's node to stop (up to 20 minutes, which the node tests' timeout allows for). A machine that
cannot run it fails these tests with the reason in one line: they are never skipped silently.
`-m "not node"` leaves them out on purpose.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import helm
from tests.kube.node import Node, NodeError, build, leftovers, preflight
from tests.node.kube import FIGURES, Kube

_build_error: list[str] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "kube_node" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.node)
            # Setup may wait for another run's node (Node.start); first, so that it wins.
            item.add_marker(pytest.mark.timeout(1500), append=False)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build before the first test: a cold build would otherwise count against its timeout.
    if any("kube_node" in getattr(item, "fixturenames", ()) for item in session.items):
        try:
            preflight()
            build()
            helm.build()
        except Exception as e:  # reported by the fixture, as each test's error
            _build_error.append(f"{type(e).__name__}: {e}".splitlines()[0])


# Per module: the node's processes and pods stop as soon as its tests are done, so they do not
# load the machine under the timing-sensitive tests that run after them.
@pytest.fixture(scope="module")
def kube_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    if _build_error:
        pytest.fail(f"the one-node cluster cannot start here: {_build_error[0]}", pytrace=False)
    node = Node()
    nft_before = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    try:
        node.start()
    except (NodeError, RuntimeError, OSError) as e:
        pytest.fail(f"the one-node cluster did not start: {str(e).splitlines()[0]}", pytrace=False)
    try:
        home = tmp_path_factory.mktemp("helm")
        charts = helm.prepare_charts(home)
        yield Kube(node, charts, Path(home))
    finally:
        node.close()
        # `down` undoes everything the node did to the host.
        left = leftovers(node.state_dir, nft_before)
        assert not left, f"the node left behind: {left}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.write_sep("-", "measured on the one-node cluster")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
