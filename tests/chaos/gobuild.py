"""Go programs the chaos tests and the bench need, built from the Go module proxy and cached.

Same pattern as tests/kube/cluster.py's ``build()``: each program is a Go module in this
repository; the binary lands in ``~/.cache/leader-sidecar/go/<name>/<hash>/`` where the hash
covers the module's go.mod, go.sum, Go files and build flags, under a lock so that parallel
sessions build once.

    python -m tests.chaos.gobuild [toxiproxy|clientgo ...]   # build (cached), print the paths
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.kube.cluster import _go, cache_root, log

REPO = Path(__file__).resolve().parents[2]
BUILD_FLAGS = ("-trimpath", "-buildvcs=false", "-ldflags=-s -w")


@dataclass(frozen=True)
class GoProgram:
    name: str
    module: Path  # the directory holding go.mod
    package: str  # what `go build` builds, relative to the module

    def hash(self) -> str:
        h = hashlib.sha256(" ".join((*BUILD_FLAGS, self.package)).encode())
        files = [self.module / "go.mod", self.module / "go.sum", *self.module.rglob("*.go")]
        for f in sorted(files):
            h.update(f.relative_to(self.module).as_posix().encode() + b"\0" + f.read_bytes())
        return h.hexdigest()[:16]

    def path(self) -> Path:
        return cache_root() / "go" / self.name / self.hash() / self.name


PROGRAMS = {
    # The TCP proxy between one sidecar and the API server (black hole, latency, resets).
    "toxiproxy": GoProgram(
        "toxiproxy",
        REPO / "tests" / "kube" / "toxiproxy",
        "github.com/Shopify/toxiproxy/v2/cmd/server",
    ),
    # client-go's own elector, the bench's anchor and a member of the mixed-fleet test.
    "clientgo": GoProgram("clientgo", REPO / "bench" / "clientgo", "."),
}


def build(name: str) -> Path:
    """Build program `name` into the cache unless it is there; return the binary."""
    program = PROGRAMS[name]
    out = program.path()
    if out.exists():
        return out
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        tmp = Path(tempfile.mkdtemp(prefix="bin.", dir=out.parent.parent))
        cmd = [_go(), "build", *BUILD_FLAGS, "-o", str(tmp / name), program.package]
        log(f"building {name} into {out.parent}")
        started = time.monotonic()
        env = {**os.environ, "CGO_ENABLED": "0"}
        proc = subprocess.Popen(cmd, cwd=program.module, env=env)
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.returncode is None:
                log(f"  still building {name} ({time.monotonic() - started:.0f}s)")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"go build of {name} failed with exit code {proc.returncode}")
        shutil.rmtree(out.parent, ignore_errors=True)
        tmp.chmod(0o755)
        tmp.rename(out.parent)
        log(f"built {name} in {time.monotonic() - started:.0f}s")
    return out


def main(argv: list[str]) -> int:
    for name in argv or sorted(PROGRAMS):
        print(build(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
