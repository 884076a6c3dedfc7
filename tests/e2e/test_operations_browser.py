"""The status page in real headless Chromium, following real sidecar processes through a handover.

Needs Debian's `chromium` and the npm package `playwright-core` in tests/browser (installed by
scripts/setup_browser.sh). Without them the test is skipped, except in CI, where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.sidecars import Sidecar, assert_never_two_leaders, start_all, wait_one_leader

BROWSER_DIR = Path(__file__).resolve().parents[1] / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TIMINGS = ["--lease-duration", "3s", "--renew-deadline", "2s", "--retry-period", "0.4s"]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is not installed (scripts/setup_browser.sh)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser (scripts/setup_browser.sh)"
    return None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[list[Sidecar]]:
    args = ["--backend", "local", "--local-dir", str(tmp_path), "--election", "shop", *TIMINGS]
    group = start_all([Sidecar("replica-a", args), Sidecar("replica-b", args)])
    yield group
    for sidecar in group:
        sidecar.stop()
    assert_never_two_leaders(group)


def test_the_status_page_follows_a_handover_without_reload(
    pair: list[Sidecar], tmp_path: Path
) -> None:
    missing = _missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    leader = wait_one_leader(pair)
    (follower,) = [s for s in pair if s is not leader]
    # `curl localhost:4040/` keeps its JSON; the browser gets the page (checked by the script).
    status, body = follower.request("GET", "/")
    assert status == 200 and body["name"] == leader.name
    shots = Path(os.environ.get("LEADER_SIDECAR_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            "node",
            str(BROWSER_DIR / "status_page.mjs"),
            "--page",
            f"http://127.0.0.1:{follower.port}/",
            "--leader",
            leader.name,
            "--next",
            follower.name,
            "--resign",
            f"http://127.0.0.1:{leader.port}/leader/resign",
            "--screenshot-before",
            str(shots / "status-page-before.png"),
            "--screenshot",
            str(shots / "status-page.png"),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["before"]["role"] == "follower"
    assert seen["after"]["role"] == "leader"
    assert seen["after"]["identity"] == follower.name
    assert seen["after"]["notReloaded"] is True
    assert (shots / "status-page.png").stat().st_size > 10_000
    wait_one_leader(pair)
    assert follower.latest["is_leader"] is True
