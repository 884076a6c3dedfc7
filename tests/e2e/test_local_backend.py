"""What only the local backend has: a flock shared with other processes, a private directory,
and a default directory that is the same for every process of a user."""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.config import default_local_dir
from sidecar.naming import lease_name
from tests.e2e.sidecars import RENEW, REPO, Sidecar, start_all, wait_one_leader


def local_args(directory: Path, election: str = "shop") -> list[str]:
    return ["--backend", "local", "--local-dir", str(directory), "--election", election]


def test_a_peer_holding_the_flock_does_not_freeze_the_http_api(
    tmp_path: Path, sidecars: Callable[..., Sidecar]
) -> None:
    """A stopped peer (SIGSTOP) holding the flock is played by this test process holding it:
    the replicas' APIs keep answering at once, the leader steps down when its renewals cannot
    land, and the election resumes once the flock is free."""
    group = start_all(sidecars(f"r{i}", local_args(tmp_path)) for i in range(2))
    leader = wait_one_leader(group)
    lock_file = tmp_path / f"{leader.leader()['lease']['name']}.lock"
    fd = os.open(lock_file, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    slowest = 0.0
    try:
        deadline = time.monotonic() + RENEW + 1.5  # past the renew deadline
        while time.monotonic() < deadline:
            for sidecar in group:
                started = time.monotonic()
                sidecar.leader()
                slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.02)
        # No renewal could land for the renew deadline: the leader stopped claiming it.
        assert not leader.leader()["is_leader"]
        assert all(s.proc.poll() is None for s in group)
    finally:
        os.close(fd)
    # A blocking flock froze the API for as long as it was held (seconds); 1 s leaves room for a
    # loaded machine without hiding that.
    assert slowest < 1.0, f"GET /leader took {slowest * 1000:.0f} ms while the flock was held"
    wait_one_leader(group, timeout=10)


def test_a_lease_directory_open_to_others_is_refused_at_start(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "run",
            *local_args(shared),
            "--http-address",
            "127.0.0.1:0",
        ],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("LEADER_SIDECAR_")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "--local-dir" in line]
    assert lines and "open to group or others" in lines[0], result.stderr


def test_replicas_with_different_tmpdirs_share_the_default_directory(
    tmp_path: Path, sidecars: Callable[..., Sidecar]
) -> None:
    election = f"tmpdir-{secrets.token_hex(4)}"
    args = ["--backend", "local", "--election", election]
    lease = default_local_dir() / lease_name("leader-sidecar", election)
    group = []
    for i in range(2):
        tmpdir = tmp_path / f"tmp{i}"
        tmpdir.mkdir()
        group.append(sidecars(f"r{i}", args, {"TMPDIR": str(tmpdir)}))
    try:
        start_all(group)
        leader = wait_one_leader(group)
        assert leader.leader()["lease"]["name"] == lease.name
        assert lease.with_suffix(".json").is_file()
    finally:
        for sidecar in group:
            sidecar.stop()
        for suffix in (".json", ".lock"):
            lease.with_suffix(suffix).unlink(missing_ok=True)
