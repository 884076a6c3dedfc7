"""helm for the chart tests, built from the Go module proxy like the API server (cached).

Library: ``build()`` returns the path of the binary, ``run(*args)`` runs it with its own
empty config/cache/data homes (nothing of the user's helm set-up is read or written),
``prepare_charts()`` copies the repository's charts aside with their dependencies vendored, and
``template()`` renders one into parsed manifests.
CLI::

    python tests/kube/helm.py build          # build (cached), print the binary's path
    python tests/kube/helm.py -- ARGS...     # run the cached helm
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tests.kube` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.kube.cluster import _go, cache_root, log

MODULE_DIR = Path(__file__).resolve().parent / "helm"
CHARTS_DIR = Path(__file__).resolve().parents[2] / "charts"
BUILD_FLAGS = ("-trimpath", "-buildvcs=false")


def _module_version(module: str) -> str:
    m = re.search(rf"^\s*{re.escape(module)} (v\S+)", (MODULE_DIR / "go.mod").read_text(), re.M)
    if not m:
        raise RuntimeError(f"{module} not found in {MODULE_DIR / 'go.mod'}")
    return m.group(1)


def helm_version() -> str:
    return _module_version("helm.sh/helm/v3")


def _ldflags() -> str:
    # What helm's Makefile sets: its own version (else `helm version` says "v3.22"), and the
    # Kubernetes version of its client libraries as the default for .Capabilities and lint
    # (else 1.20).
    major, minor = _module_version("k8s.io/client-go").lstrip("v").split(".")[:2]
    kube_major, kube_minor = str(int(major) + 1), minor
    flags = ["-s", "-w", f"-X helm.sh/helm/v3/internal/version.version={helm_version()}"]
    flags += ["-X helm.sh/helm/v3/internal/version.gitTreeState=clean"]
    for pkg in ("helm.sh/helm/v3/pkg/chartutil", "helm.sh/helm/v3/pkg/lint/rules"):
        flags += [
            f"-X {pkg}.k8sVersionMajor={kube_major}",
            f"-X {pkg}.k8sVersionMinor={kube_minor}",
        ]
    return " ".join(flags)


def module_hash() -> str:
    h = hashlib.sha256(" ".join((*BUILD_FLAGS, _ldflags())).encode())
    for f in sorted((MODULE_DIR / "go.mod", MODULE_DIR / "go.sum")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def binary() -> Path:
    return cache_root() / "helm" / module_hash() / "bin" / "helm"


def build() -> Path:
    """Build helm into the cache unless already there; return the binary's path."""
    out = binary()
    if out.exists():
        return out
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    # Parallel sessions/CI runs build once; the rename of the whole bin dir is atomic.
    with open(out.parent.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        tmp = Path(tempfile.mkdtemp(prefix="bin.", dir=out.parent.parent))
        cmd = [
            _go(),
            "build",
            *BUILD_FLAGS,
            f"-ldflags={_ldflags()}",
            "-o",
            str(tmp / "helm"),
            "helm.sh/helm/v3/cmd/helm",
        ]
        log(f"building helm {helm_version()} into {out} (cold Go cache: a few minutes)")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=MODULE_DIR, env={**os.environ, "CGO_ENABLED": "0"})
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.returncode is None:
                log(f"  still building helm ({time.monotonic() - start:.0f}s)")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"go build of helm failed with exit code {proc.returncode}")
        shutil.rmtree(out.parent, ignore_errors=True)
        tmp.chmod(0o755)
        tmp.rename(out.parent)
        log(f"built helm in {time.monotonic() - start:.0f}s")
    return out


def isolated_env(home: Path) -> dict[str, str]:
    """Environment for helm with its config, cache and data under `home` (no user set-up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env.pop("KUBECONFIG", None)
    for kind in ("CONFIG", "CACHE", "DATA"):
        env[f"HELM_{kind}_HOME"] = str(home / kind.lower())
    return env


def run(
    *args: str | Path, home: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the cached helm (building it first if needed); output captured as text."""
    helm = build()
    with contextlib.ExitStack() as stack:
        if home is None:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="helm-home.")))
        proc = subprocess.run(
            [str(helm), *map(str, args)],
            env=isolated_env(home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"helm {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}"
        )
    return proc


def prepare_charts(dest: Path) -> Path:
    """Copy charts/ to `dest`/charts and vendor each chart's file:// dependencies there.

    Works on a copy so that tests never write into the checkout (others may render at once).
    """
    charts = dest / "charts"
    shutil.copytree(
        CHARTS_DIR, charts, ignore=shutil.ignore_patterns("charts", "Chart.lock", ".gitignore")
    )
    for chart in sorted(charts.iterdir()):
        if "dependencies:" in (chart / "Chart.yaml").read_text():
            run("dependency", "update", "--skip-refresh", chart, home=dest / "helm-home")
    return charts


def template(
    chart: Path,
    release: str,
    namespace: str,
    values: Mapping[str, Any] | None = None,
    *,
    home: Path,
) -> tuple[str, list[dict[str, Any]]]:
    """`helm template` with `values` (a dict, passed as a file): the text and its documents."""
    import yaml  # a kubernetes-asyncio dependency, so always installed with the package

    values_file = (
        home / f"values-{hashlib.sha256(json.dumps(values or {}).encode()).hexdigest()[:12]}.json"
    )
    values_file.parent.mkdir(parents=True, exist_ok=True)
    values_file.write_text(json.dumps(values or {}))
    out = run(
        "template", release, chart, "--namespace", namespace, "--values", values_file, home=home
    ).stdout
    return out, [doc for doc in yaml.safe_load_all(out) if doc]


def main(argv: list[str]) -> int:
    if argv[:1] == ["build"]:
        print(build())
        return 0
    if argv[:1] == ["--"]:
        helm = build()
        return subprocess.call([str(helm), *argv[1:]])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
