"""Build the node components (kubelet, kube-proxy, kube-scheduler, kube-controller-manager)
from the Go module proxy at the API server's release, cached like tests/kube/cluster.py's."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests.kube` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.kube import cluster

MODULE_DIR = Path(__file__).resolve().parent / "node-tools"
BINARIES = ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager")
BUILD_FLAGS = cluster.BUILD_FLAGS


def k8s_version() -> str:
    m = re.search(r"k8s\.io/kubernetes (v\S+)", (MODULE_DIR / "go.mod").read_text())
    if not m:
        raise RuntimeError("k8s.io/kubernetes not found in node-tools/go.mod")
    return m.group(1)


def module_hash() -> str:
    h = hashlib.sha256(" ".join((*BUILD_FLAGS, cluster._ldflags())).encode())
    for f in sorted((MODULE_DIR / "go.mod", MODULE_DIR / "go.sum")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def bin_dir() -> Path:
    return cluster.cache_root() / "node" / module_hash() / "bin"


def build() -> Path:
    """Build the four node binaries into the cache unless already there; return the bin dir."""
    if k8s_version() != cluster._k8s_version():
        raise RuntimeError(
            f"node-tools pins Kubernetes {k8s_version()}, the API server {cluster._k8s_version()}"
        )
    out = bin_dir()
    if all((out / b).exists() for b in BINARIES):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((out / b).exists() for b in BINARIES):
            return out
        tmp = Path(tempfile.mkdtemp(prefix="bin.", dir=out.parent))
        cmd = [
            cluster._go(),
            "build",
            *BUILD_FLAGS,
            f"-ldflags={cluster._ldflags()}",
            "-o",
            f"{tmp}/",
            *(f"k8s.io/kubernetes/cmd/{b}" for b in BINARIES),
        ]
        # kubelet and kube-proxy need no cgo on Linux for what the harness uses.
        env = {**os.environ, "CGO_ENABLED": "0"}
        cluster.log(
            f"building {', '.join(BINARIES)} {k8s_version()} into {out}"
            " (cold: ~15 min on 2 cores, less once kube-apiserver is built; cached afterwards)"
        )
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=MODULE_DIR, env=env)
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            if proc.returncode is None:
                cluster.log(f"  still building the node ({time.monotonic() - start:.0f}s)")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"go build of the node failed with exit code {proc.returncode}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.chmod(0o755)
        tmp.rename(out)
        cluster.log(f"built the node in {time.monotonic() - start:.0f}s")
    return out


if __name__ == "__main__":
    print(build())
