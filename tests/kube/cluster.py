"""A real kube-apiserver + etcd on loopback for the e2e tests, built from source with Go.

Library: ``Cluster`` (see its docstring). CLI for people::

    python tests/kube/cluster.py build            # build (cached), print the bin dir
    python tests/kube/cluster.py up --dir DIR     # start detached, write DIR/kubeconfig
    python tests/kube/cluster.py down --dir DIR   # stop it and remove what `up` wrote
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOOLS_DIR = Path(__file__).resolve().parent / "tools"
BINARIES = ("kube-apiserver", "etcd")
# Part of the cache key, so changing the flags rebuilds.
BUILD_FLAGS = ("-trimpath", "-buildvcs=false")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc"
# The `up` CLI writes these into --dir; `down` removes exactly these.
STATE_ENTRIES = (
    "pki",
    "etcd-data",
    "tokens.csv",
    "kubeconfig",
    "cluster.json",
    "etcd.log",
    "kube-apiserver.log",
)
# Users of the static token file: name -> groups (all also get system:authenticated).
USERS: dict[str, tuple[str, ...]] = {
    "admin": ("system:masters",),
    "noaccess": (),
    "sidecar-user": (),
}

Json = dict[str, Any]


def log(msg: str) -> None:
    print(f"[kube] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- build


def cache_root() -> Path:
    env = os.environ.get("LEADER_SIDECAR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "leader-sidecar"


def _k8s_version() -> str:
    m = re.search(r"k8s\.io/kubernetes (v\S+)", (TOOLS_DIR / "go.mod").read_text())
    if not m:
        raise RuntimeError("k8s.io/kubernetes not found in tools/go.mod")
    return m.group(1)


def _ldflags() -> str:
    # -X makes /version report the real release instead of v0.0.0-master.
    v = _k8s_version()
    major, minor = v.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    return (
        f"-s -w -X {pkg}.gitVersion={v} -X {pkg}.gitMajor={major}"
        f" -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean"
    )


def tools_hash() -> str:
    h = hashlib.sha256(" ".join((*BUILD_FLAGS, _ldflags())).encode())
    files = [TOOLS_DIR / "go.mod", TOOLS_DIR / "go.sum", *TOOLS_DIR.rglob("*.go")]
    for f in sorted(files):
        h.update(f.relative_to(TOOLS_DIR).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def bin_dir() -> Path:
    return cache_root() / "kube" / tools_hash() / "bin"


def _go() -> str:
    # Fall back to the standard install location, which is often not on PATH.
    default = Path(os.environ.get("GOROOT", "/usr/local/go")) / "bin" / "go"
    go = shutil.which("go") or (str(default) if default.exists() else None)
    if not go:
        raise RuntimeError("`go` not found on PATH (needed to build kube-apiserver and etcd)")
    return go


def build() -> Path:
    """Build kube-apiserver and etcd into the cache unless already there; return the bin dir."""
    out = bin_dir()
    if all((out / b).exists() for b in BINARIES):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # A lock so that parallel sessions/CI runs build once; the rename makes the result atomic.
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((out / b).exists() for b in BINARIES):
            return out
        tmp = Path(tempfile.mkdtemp(prefix="bin.", dir=out.parent))
        cmd = [
            _go(),
            "build",
            *BUILD_FLAGS,
            f"-ldflags={_ldflags()}",
            "-o",
            f"{tmp}/",
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "./etcd",
        ]
        env = {**os.environ, "CGO_ENABLED": "0"}
        log(
            f"building kube-apiserver {_k8s_version()} + etcd into {out}"
            " (cold Go cache: ~8 min on 2 cores; cached afterwards)"
        )
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=TOOLS_DIR, env=env)
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.returncode is None:
                log(f"  still building ({time.monotonic() - start:.0f}s)")
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"go build failed with exit code {proc.returncode}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.chmod(0o755)
        tmp.rename(out)
        log(f"built in {time.monotonic() - start:.0f}s")
    return out


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _make_pki(pki: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """CA, a serving cert for 127.0.0.1/localhost (and `extra_ips`), and the service-account
    RSA key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        pki / "ca.key",
        "-out",
        pki / "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=leader-sidecar-test-ca",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    _openssl(
        "req",
        *ec,
        "-keyout",
        pki / "server.key",
        "-out",
        pki / "server.csr",
        "-subj",
        "/CN=kube-apiserver",
    )
    ext = pki / "server.ext"
    # Full set of extensions so that strict verifiers (e.g. Python 3.13's default) accept it.
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,"
        "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
        + "".join(f",IP:{ip}" for ip in extra_ips)
        + "\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        pki / "server.csr",
        "-CA",
        pki / "ca.crt",
        "-CAkey",
        pki / "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        ext,
        "-out",
        pki / "server.crt",
    )
    _openssl("genrsa", "-out", pki / "sa.key", "2048")
    _openssl("rsa", "-in", pki / "sa.key", "-pubout", "-out", pki / "sa.pub")


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None]:
    """preexec_fn: the child gets SIGKILL when the process that started it dies."""
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: keep the child minimal

    def fn() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return fn


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _stop(proc: subprocess.Popen[bytes] | None, kill: bool) -> None:
    """SIGTERM (or SIGKILL) a child's process group; SIGKILL it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    _signal_group(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


# --------------------------------------------------------------------------- cluster


class Cluster:
    """etcd + kube-apiserver on free loopback ports, state in ``state_dir``.

    ``start()`` (or ``with Cluster() as c``) generates PKI and tokens, starts both and
    waits for /readyz. Processes die with the Python process that started them, unless
    ``detached=True`` (used by the ``up`` CLI).
    """

    # Where kube-apiserver listens and advertises itself; the one-node cluster (node.py) uses an
    # address on its pod bridge, which pods can reach.
    host = "127.0.0.1"

    def __init__(
        self, state_dir: Path | None = None, bin_dir: Path | None = None, *, detached: bool = False
    ) -> None:
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="leader-sidecar-kube."))
        self.state_dir = self.state_dir.resolve()
        self._bin_dir = bin_dir
        self._detached = detached
        self.ca_file = self.state_dir / "pki" / "ca.crt"
        self.tokens: dict[str, str] = {u: secrets.token_hex(16) for u in USERS}
        self.etcd_port, self.etcd_peer_port, self.port = free_port(), free_port(), free_port()
        self.server = f"https://{self.host}:{self.port}"
        self.kubeconfig = self.state_dir / "kubeconfig"
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None
        self.apiserver_start_seconds = 0.0  # process start to /readyz, last start

    @property
    def admin_token(self) -> str:
        return self.tokens["admin"]

    # -- lifecycle

    def start(self) -> Cluster:
        try:
            bins = self._bin_dir or build()
            self._bin_dir = bins
            self.state_dir.mkdir(parents=True, exist_ok=True)
            _make_pki(self.state_dir / "pki", () if self.host == "127.0.0.1" else (self.host,))
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
            (self.state_dir / "tokens.csv").write_text(
                "".join(
                    f"{self.tokens[u]},{u},uid-{u}" + (f',"{",".join(g)}"' if g else "") + "\n"
                    for u, g in USERS.items()
                )
            )
            self.kubeconfig_for("admin", self.kubeconfig)
            self.start_etcd()
            self.start_apiserver()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        assert self._bin_dir is not None
        # Appended to across restarts; the child keeps its own copy of the descriptor.
        with open(self.state_dir / f"{name}.log", "ab") as logf:
            return subprocess.Popen(
                [str(self._bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                # Own process group: killpg reaches anything it forks, and Ctrl-C in a
                # terminal does not hit it before we can shut it down in order.
                start_new_session=True,
                preexec_fn=None if self._detached else _die_with_parent(),
            )

    def start_etcd(self, timeout: float = 30.0) -> None:
        if self._etcd and self._etcd.poll() is None:
            return
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self._etcd = self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={self.state_dir / 'etcd-data'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--log-level=warn",
                # Test data only: skipping fsync makes every write much faster.
                "--unsafe-no-fsync",
            ],
        )
        self._wait("etcd", self._etcd, self._etcd_healthy, timeout)

    def start_apiserver(self, timeout: float = 60.0) -> None:
        if self._apiserver and self._apiserver.poll() is None:
            return
        started = time.monotonic()
        self._apiserver = self._spawn("kube-apiserver", self.apiserver_args())
        self._wait("kube-apiserver", self._apiserver, self._apiserver_ready, timeout)
        self.apiserver_start_seconds = time.monotonic() - started

    def apiserver_args(self) -> list[str]:
        pki = self.state_dir / "pki"
        return [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--secure-port={self.port}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={self.state_dir / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--anonymous-auth=false",
            "--service-cluster-ip-range=10.0.0.0/24",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
            # No controller-manager runs: ServiceAccount admission would reject every Pod
            # for lack of a `default` ServiceAccount.
            "--disable-admission-plugins=ServiceAccount",
            # The `kubernetes` Service endpoint reconciler refuses a loopback address.
            "--endpoint-reconciler-type=none",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
        ]

    def ensure_running(self) -> None:
        """Restart whatever a previous test left stopped (no-op when both are up)."""
        self.start_etcd()
        self.start_apiserver()

    def stop_apiserver(self, kill: bool = False) -> None:
        """Stop kube-apiserver (SIGTERM, or SIGKILL with kill=True); etcd keeps its data."""
        _stop(self._apiserver, kill)
        self._apiserver = None

    def stop_etcd(self, kill: bool = False) -> None:
        """Stop etcd. SIGTERM takes ~7 s while the apiserver holds watches (etcd waits out
        its request timeout); kill=True is instant and loses nothing short of a host crash."""
        _stop(self._etcd, kill)
        self._etcd = None

    def close(self) -> None:
        self.stop_apiserver()
        self.stop_etcd()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _wait(
        self, name: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if ready():
                return
            time.sleep(0.2)
        logfile = self.state_dir / f"{name}.log"
        _stop(proc, kill=True)
        raise RuntimeError(
            f"{name} did not become ready (exit code {proc.returncode});"
            f" tail of {logfile}:\n{_tail(logfile)}"
        )

    def _etcd_healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.etcd_port, timeout=2)
            conn.request("GET", "/health")
            return b'"true"' in conn.getresponse().read()
        except OSError:
            return False

    def _apiserver_ready(self) -> bool:
        try:
            return self.api("GET", "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    # -- clients

    def token_for(self, user: str) -> str:
        return self.tokens[user]

    def kubeconfig_for(self, user_or_token: str, path: Path | None = None) -> Path:
        """Write a kubeconfig for a token-file user name or a raw bearer token."""
        token = self.tokens.get(user_or_token, user_or_token)
        user = user_or_token if user_or_token in self.tokens else "token-user"
        if path is None:
            path = self.state_dir / f"kubeconfig-{hashlib.sha256(token.encode()).hexdigest()[:12]}"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: test\n  cluster:\n    server: {_q(self.server)}\n"
            f"    certificate-authority: {_q(str(self.ca_file))}\n"
            f"users:\n- name: {_q(user)}\n  user:\n    token: {_q(token)}\n"
            f"contexts:\n- name: test\n  context:\n    cluster: test\n    user: {_q(user)}\n"
            "current-context: test\n"
        )
        path.chmod(0o600)
        return path

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def api(
        self,
        method: str,
        path: str,
        body: Json | None = None,
        token: str | None = None,
        *,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> tuple[int, Any]:
        """One JSON request as admin (or `token`); returns (status, parsed body or None).

        PATCH defaults to a JSON merge patch. Raises OSError when it cannot connect.
        """
        if content_type is None:
            content_type = (
                "application/merge-patch+json" if method == "PATCH" else "application/json"
            )
        headers = {
            "Authorization": f"Bearer {token or self.admin_token}",
            "Accept": "application/json",
            "Content-Type": content_type,
        }
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=timeout, context=self.ssl_context()
        )
        try:
            conn.request(method, path, None if body is None else json.dumps(body), headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")  # e.g. /readyz's "ok"

    def create_token(
        self, namespace: str, service_account: str, expiration_seconds: int = 3600
    ) -> str:
        """Mint a ServiceAccount token through the TokenRequest API."""
        status, body = self.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        if status != 201:
            raise RuntimeError(f"TokenRequest failed: {status} {body}")
        return str(body["status"]["token"])

    # -- detached (CLI) state

    def save(self) -> None:
        assert self._etcd and self._apiserver
        (self.state_dir / "cluster.json").write_text(
            json.dumps(
                {
                    "server": self.server,
                    "pids": {"etcd": self._etcd.pid, "kube-apiserver": self._apiserver.pid},
                    "bin_dir": str(self._bin_dir),
                    "tokens": self.tokens,
                },
                indent=2,
            )
        )


def _alive(pid: int) -> bool:
    """True unless gone or a zombie (an orphan's zombie lingers until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def down(state_dir: Path) -> None:
    """Stop a cluster started by `up` and remove the files it wrote into `state_dir`."""
    state = state_dir / "cluster.json"
    if state.exists():
        info = json.loads(state.read_text())
        for name in ("kube-apiserver", "etcd"):
            pid = int(info["pids"][name])
            # Only signal the pid if it still runs our binary (pids get reused).
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/exe").resolve() == (Path(info["bin_dir"]) / name).resolve():
                    _signal_group(pid, signal.SIGTERM)
                    for _ in range(150):  # not our child: poll until it is gone
                        if not _alive(pid):
                            break
                        time.sleep(0.1)
                    _signal_group(pid, signal.SIGKILL)
    for entry in STATE_ENTRIES:
        p = state_dir / entry
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state_dir.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build kube-apiserver and etcd (cached); print the bin dir")
    for name in ("up", "down"):
        sub.add_parser(name).add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print(build())
    elif args.cmd == "up":
        if (args.dir / "cluster.json").exists():
            parser.error(f"{args.dir} already holds a cluster; run `down --dir {args.dir}`")
        cluster = Cluster(args.dir, detached=True).start()
        cluster.save()
        print(
            f"kube-apiserver ready at {cluster.server} (state in {cluster.state_dir})\n"
            f"  export KUBECONFIG={cluster.kubeconfig}\n"
            f"  other users' tokens: {cluster.state_dir / 'tokens.csv'}\n"
            f"  stop: python {Path(__file__)} down --dir {args.dir}"
        )
    else:
        down(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
