"""Container images for the one-node cluster, built here without any image registry (cached).

- ``base``: the stand-in for the official ``python:3.11-slim-bookworm`` the Dockerfile's
  ``PYTHON_IMAGE`` names: Debian bookworm with Python 3.11 and ``python`` on PATH, made from
  Debian's packages with debootstrap (about 4 minutes, once per machine).
- ``sidecar``: the project's Dockerfile as written, built by buildah on that base.
- ``app``: the example chart's demo app (it runs ``curl``): the base plus Debian's curl.
- ``pause``: the pod sandbox image (``pause/``, a few lines of Go, ``FROM scratch``).
- ``clientgo``: client-go's elector (``bench/clientgo``), ``FROM scratch``, for the rollout bench.

Images live in buildah's storage under the cache folder (vfs driver, no mounts left behind) and
are handed to containerd as docker archives (``ctr -n k8s.io images import``).
CLI::

    python tests/kube/images.py build     # build every image (cached), print their references
    python tests/kube/images.py base      # just the Debian base (CI builds it during the Go builds)
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
from collections.abc import Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tests.kube` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.kube.cluster import _go, cache_root, log

ROOT = Path(__file__).resolve().parents[2]
PAUSE_DIR = Path(__file__).resolve().parent / "pause"
CLIENTGO_DIR = ROOT / "bench" / "clientgo"

# The base image's recipe; part of its cache key.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
BASE_CONTAINERFILE = """\
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    LANG=C.UTF-8
CMD ["python3"]
"""
APP_CONTAINERFILE = """\
FROM {base}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl \\
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
USER 100:101
"""
SCRATCH_CONTAINERFILE = """\
FROM scratch
COPY {name} /{name}
USER 65532:65532
ENTRYPOINT ["/{name}"]
"""
# The files the Dockerfile copies (with .dockerignore honoured by buildah): the sidecar image's
# cache key is their content.
SIDECAR_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "sidecar")


def _hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _tree_hash(paths: Sequence[Path], base: Path) -> str:
    h = hashlib.sha256()
    for top in paths:
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for f in files:
            if f.is_file() and "__pycache__" not in f.parts:
                h.update(f.relative_to(base).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- buildah


def storage_dir() -> Path:
    return cache_root() / "buildah"


def buildah(*args: str, capture: bool = False, cwd: Path | None = None) -> str:
    """Run buildah on the harness's own storage (vfs: plain directories, no mounts)."""
    store = storage_dir()
    cmd = [
        "buildah",
        "--root",
        str(store / "root"),
        "--runroot",
        str(store / "run"),
        "--storage-driver",
        "vfs",
        *args,
    ]
    env = {**os.environ, "BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": "vfs"}
    if capture:
        return subprocess.run(
            cmd, check=True, capture_output=True, text=True, env=env, cwd=cwd
        ).stdout
    proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=sys.stderr, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"buildah {' '.join(args[:2])} failed (exit code {proc.returncode})")
    return ""


def image_exists(ref: str) -> bool:
    try:
        buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref, capture=True)
    except subprocess.CalledProcessError:
        return False
    return True


def image_id(ref: str) -> str:
    return buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref, capture=True)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _host_ca_bundle() -> list[str]:
    """RUN steps download (pip from PyPI, apt from Debian) through whatever this machine
    trusts, e.g. a TLS-inspecting egress proxy: its CA bundle is mounted over the image's during
    RUN only and is not part of the image."""
    bundle = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return []
    return ["--volume", f"{bundle.resolve()}:/etc/ssl/certs/ca-certificates.crt:ro"]


def _bud(ref: str, context: Path, containerfile: Path, *extra: str) -> None:
    buildah(
        "bud",
        "--isolation",
        "chroot",
        "--layers=false",
        *_host_ca_bundle(),
        "-f",
        str(containerfile),
        "-t",
        ref,
        *extra,
        str(context),
    )


def archive(ref: str) -> Path:
    """The image as a docker archive (what `ctr images import` reads), cached next to it."""
    repo = ref.rpartition(":")[0].rpartition("/")[2]
    out = cache_root() / "images" / f"{repo}-{_hash(ref, image_id(ref))}.tar"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # One archive per image name: the previous builds' go (each is hundreds of MB).
        for old in out.parent.glob(f"{repo}-*.tar"):
            old.unlink()
        tmp = out.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        buildah("push", "--quiet", ref, f"docker-archive:{tmp}:{ref}")
        tmp.rename(out)
    return out


def _prune(ref: str) -> None:
    """Remove the other tags of `ref`'s repository from buildah's storage (old builds)."""
    repo = ref.rpartition(":")[0]
    listing = buildah("images", "--format", "{{.Name}}:{{.Tag}}", capture=True)
    for other in set(listing.split()):
        if other.rpartition(":")[0] == repo and other != ref:
            with contextlib.suppress(subprocess.CalledProcessError):
                buildah("rmi", "--force", other, capture=True)


# --------------------------------------------------------------------------- images


def base_ref() -> str:
    key = _hash(DEBIAN_SUITE, DEBIAN_MIRROR, *BASE_PACKAGES, BASE_CONTAINERFILE)
    return f"localhost/leader-sidecar-python:3.11-{DEBIAN_SUITE}-{key}"


def _umount_below(path: Path) -> None:
    """debootstrap mounts /proc and /sys in its target; a failed run can leave them."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def build_base() -> str:
    ref = base_ref()
    if image_exists(ref):
        return ref
    for tool in ("debootstrap", "buildah"):
        if not shutil.which(tool):
            raise RuntimeError(f"`{tool}` not found (Debian package {tool})")
    work = Path(tempfile.mkdtemp(prefix="base.", dir=cache_root()))
    rootfs = work / "rootfs"
    start = time.monotonic()
    log(f"building the base image {ref} with debootstrap (~4 min, once)")
    try:
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=sys.stderr,
        )
        _umount_below(rootfs)
        # Shape of the official image: pip may install (no PEP 668 marker), no apt lists or docs.
        for junk in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        subprocess.run(
            [
                "tar",
                "-C",
                str(rootfs),
                "--numeric-owner",
                "--exclude=./dev/*",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "--exclude=./debootstrap",
                "-cf",
                str(work / "rootfs.tar"),
                ".",
            ],
            check=True,
        )
        shutil.rmtree(rootfs)
        (work / "Containerfile").write_text(BASE_CONTAINERFILE)
        _bud(ref, work, work / "Containerfile")
    finally:
        _umount_below(rootfs)
        shutil.rmtree(work, ignore_errors=True)
    log(f"base image built in {time.monotonic() - start:.0f}s")
    return ref


def sidecar_ref() -> str:
    from sidecar import __version__

    key = _tree_hash([ROOT / p for p in SIDECAR_INPUTS], ROOT)
    return f"localhost/leader-sidecar:{__version__}-{_hash(key, base_ref())}"


def build_sidecar() -> str:
    """The project's Dockerfile, unchanged, with PYTHON_IMAGE pointing at the local base."""
    ref = sidecar_ref()
    if image_exists(ref):
        return ref
    base = build_base()
    start = time.monotonic()
    log(f"building {ref} from the Dockerfile")
    _bud(ref, ROOT, ROOT / "Dockerfile", "--build-arg", f"PYTHON_IMAGE={base}")
    log(f"sidecar image built in {time.monotonic() - start:.0f}s")
    _prune(ref)
    return ref


def app_ref() -> str:
    return f"localhost/leader-sidecar-demo-app:{_hash(APP_CONTAINERFILE, base_ref())}"


def build_app() -> str:
    ref = app_ref()
    if image_exists(ref):
        return ref
    base = build_base()
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        (Path(tmp) / "Containerfile").write_text(APP_CONTAINERFILE.format(base=base))
        _bud(ref, Path(tmp), Path(tmp) / "Containerfile")
    return ref


def _go_static(module: Path, out: Path) -> None:
    env = {**os.environ, "CGO_ENABLED": "0"}
    subprocess.run(
        [_go(), "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", str(out), "."],
        cwd=module,
        env=env,
        check=True,
    )


def _scratch_image(name: str, module: Path) -> str:
    key = _tree_hash([module], module)
    ref = f"localhost/leader-sidecar-{name}:{_hash(key, SCRATCH_CONTAINERFILE)}"
    if image_exists(ref):
        return ref
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        _go_static(module, Path(tmp) / name)
        (Path(tmp) / "Containerfile").write_text(SCRATCH_CONTAINERFILE.format(name=name))
        _bud(ref, Path(tmp), Path(tmp) / "Containerfile")
    return ref


def build_pause() -> str:
    return _scratch_image("pause", PAUSE_DIR)


def build_clientgo() -> str:
    return _scratch_image("clientgo", CLIENTGO_DIR)


def build_all() -> dict[str, str]:
    """Every image the node needs (cached); returns name -> reference."""
    with _locked():
        return {
            "pause": build_pause(),
            "sidecar": build_sidecar(),
            "app": build_app(),
            "clientgo": build_clientgo(),
        }


if __name__ == "__main__":
    if sys.argv[1:] == ["base"]:
        with _locked():
            print(build_base())
    elif sys.argv[1:] == ["build"]:
        for name, ref in build_all().items():
            print(f"{name}\t{ref}")
    else:
        sys.exit(__doc__)
