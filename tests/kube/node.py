"""A one-node Kubernetes cluster on this machine for the pod-level tests (tests/node/).

etcd + kube-apiserver (``cluster.py``) plus kube-controller-manager, kube-scheduler, kube-proxy
and kubelet, all built from the Go module proxy at the same release (``node_build.py``), with
Debian's containerd, runc and CNI plugins, and images built here without a registry
(``images.py``: the project's Dockerfile on a base made from Debian's packages).

The network stays inside this machine: pods live in network namespaces containerd makes for them
on the bridge ``lsnode0`` (10.244.0.0/24); the node's address 10.244.0.1 is on that bridge, the
API server listens there, and a route pins the Service range (10.0.0.0/24) to the bridge, so
nothing for either range leaves by the machine's own interfaces. Pods get no default route.
Host sysctls the kubelet or CNI could change are recorded first and restored by ``down``.

Library: ``Node`` (a context manager). CLI for people (as root)::

    python tests/kube/node.py build               # build binaries and images (cached)
    python tests/kube/node.py up --dir DIR        # start; writes DIR/kubeconfig, DIR/image,
                                                  # DIR/app-image, DIR/clientgo-image
    python tests/kube/node.py down --dir DIR      # stop and remove all of it (also after a crash)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tests.kube` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.kube import cluster, images, node_build
from tests.kube.cluster import Cluster, _alive, _die_with_parent, _openssl, _tail, free_port, log

NODE_NAME = "leader-sidecar-node"
BRIDGE = "lsnode0"
NODE_IP = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"
SERVICE_RANGE = "10.0.0.0/24"
CNI_NETWORK = "leader-sidecar-node"
# kubelet's pods cgroup lives below this in every cgroup v1 hierarchy.
CGROUP_ROOT = "leader-sidecar-node"
CGROUP_FS = Path("/sys/fs/cgroup")
CNI_BIN_DIR = Path("/usr/lib/cni")
# Host settings the kubelet (setupKernelTunables), the bridge CNI plugin or kube-proxy may write:
# recorded by `up`, put back by `down`.
SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
# nftables tables the node may create: kube-proxy's own, and iptables-nft tables for the
# kubelet's canary chains (KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT).
NFT_TABLES = tuple(
    (family, name) for family in ("ip", "ip6") for name in ("kube-proxy", "mangle", "nat", "filter")
)
COMPONENTS = ("kubelet", "kube-proxy", "kube-scheduler", "kube-controller-manager", "containerd")
# Files and folders `up` writes into DIR besides the API server's (cluster.STATE_ENTRIES).
NODE_ENTRIES = ("node", "node.json", "image", "app-image", "clientgo-image", "pause-image")

Json = dict[str, Any]


class NodeError(RuntimeError):
    """The node could not start; str() is one line saying why."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


# --------------------------------------------------------------------------- build


def build() -> dict[str, str]:
    """Everything the node needs, built and cached: binaries and images."""
    cluster.build()
    node_build.build()
    return images.build_all()


def preflight() -> None:
    """Raise NodeError with one line when this machine cannot run the node."""
    if os.geteuid() != 0:
        raise NodeError("the one-node cluster needs root (network namespaces, cgroups, mounts)")
    for tool, package in (
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("ctr", "containerd"),
        ("buildah", "buildah"),
        ("debootstrap", "debootstrap"),
        ("nft", "nftables"),
        ("ip", "iproute2"),
    ):
        if not shutil.which(tool):
            raise NodeError(f"`{tool}` not found: apt-get install {package}")
    if not (CNI_BIN_DIR / "bridge").exists():
        raise NodeError(
            f"no CNI plugins in {CNI_BIN_DIR}: apt-get install containernetworking-plugins"
        )
    if not (CGROUP_FS / "memory").is_dir() and not (CGROUP_FS / "cgroup.controllers").exists():
        raise NodeError(f"no cgroup filesystem at {CGROUP_FS}")


# --------------------------------------------------------------------------- one at a time


def _lock_path() -> Path:
    return cluster.cache_root() / "node.lock"


def _active_path() -> Path:
    """Which state dir the machine's node lives in, and who started it (JSON)."""
    return cluster.cache_root() / "node.active"


def _acquire(timeout: float) -> int:
    """One node per machine (its bridge, subnet and kube-proxy table are fixed): wait for the
    node of another run to go, then take over the leftovers of one whose owner died."""
    _lock_path().parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(), os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    said = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise NodeError(
                    f"another run's node is still up after {timeout:.0f}s (lock {_lock_path()})"
                ) from None
            if time.monotonic() - said > 30:
                log("waiting for another run's node to stop")
                said = time.monotonic()
            time.sleep(1)
    try:
        active = json.loads(_active_path().read_text())
    except (OSError, ValueError):
        active = {}
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        owner = int(active.get("pid", 0))
        if active.get("cli") and owner and _alive(owner):
            os.close(fd)
            raise NodeError(
                f"a node started by `node.py up --dir {active.get('dir')}` is running:"
                " `down` it first"
            )
        if active.get("dir"):
            log(f"removing the leftovers of a node whose owner died ({active['dir']})")
            down(Path(active["dir"]), remove_dir=False)
        if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            os.close(fd)
            raise NodeError(f"bridge {BRIDGE} exists and no node owns it: remove it or `down` it")
    return fd


# --------------------------------------------------------------------------- API server


class NodeCluster(Cluster):
    """The API server on the node's bridge address, with ServiceAccount admission and the
    `kubernetes` Service's endpoint reconciled to that address (pods reach it through it)."""

    host = NODE_IP

    def apiserver_args(self) -> list[str]:
        drop = ("--disable-admission-plugins=", "--endpoint-reconciler-type=")
        args = [a for a in super().apiserver_args() if not a.startswith(drop)]
        pki = self.state_dir / "pki"
        return [
            *args,
            # `kubectl logs/exec` go from the API server to the kubelet with this client cert.
            f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def start_apiserver(self, timeout: float = 60.0) -> None:
        pki = self.state_dir / "pki"
        if not (pki / "kubelet-client.crt").exists():
            _client_cert(pki, "kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
        super().start_apiserver(timeout)


def _client_cert(pki: Path, name: str, cn: str, org: str) -> None:
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", *ec, "-keyout", pki / f"{name}.key", "-out", pki / f"{name}.csr",
        "-subj", f"/O={org}/CN={cn}",
    )  # fmt: skip
    ext = pki / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   "extendedKeyUsage=clientAuth\n")  # fmt: skip
    _openssl(
        "x509", "-req", "-in", pki / f"{name}.csr", "-CA", pki / "ca.crt", "-CAkey",
        pki / "ca.key", "-CAcreateserial", "-days", "3650", "-extfile", ext,
        "-out", pki / f"{name}.crt",
    )  # fmt: skip


# --------------------------------------------------------------------------- node


class Node:
    """The whole one-node cluster, state in ``state_dir``.

    ``start()`` builds what is missing, starts everything and returns once the node is Ready and
    the ``default`` namespace has its ServiceAccount and root CA. ``close()`` is ``down``.
    Attributes for tests: ``api`` (the NodeCluster: ``api.api(...)``, tokens), ``kubeconfig``,
    ``image``, ``app_image``, ``clientgo_image``, ``containerd_socket``, ``start_seconds``.
    """

    def __init__(self, state_dir: Path | None = None, *, detached: bool = False) -> None:
        self._own_dir = state_dir is None
        # Short: containerd's socket path must stay under the 108-byte limit.
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="ls-node.")).resolve()
        self.detached = detached
        self.dir = self.state_dir / "node"
        self.api = NodeCluster(self.state_dir, detached=detached)
        self.kubeconfig = self.api.kubeconfig
        self.containerd_socket = self.dir / "containerd" / "containerd.sock"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.image = self.app_image = self.clientgo_image = ""
        self.start_seconds = 0.0
        self._lock_fd: int | None = None

    # -- lifecycle

    def start(self, wait_for_other: float = 1200.0) -> Node:
        preflight()
        refs = build()
        self._lock_fd = _acquire(wait_for_other)
        started = time.monotonic()
        self.image, self.app_image = refs["sidecar"], refs["app"]
        self.clientgo_image = refs["clientgo"]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save_state()  # first, so that `down` finds what to undo even after a crash
        # For the CLI (`detached`) the owner is the kubelet, which outlives this process.
        _active_path().write_text(json.dumps({"dir": str(self.state_dir), "pid": os.getpid()}))
        try:
            self._record_host()
            self._network()
            self.api.start()
            self._containerd(refs)
            self._cgroups()
            self._kubelet()
            self._kube_proxy()
            self._control_plane()
            self._save_state()
            self._wait_ready()
        except BaseException:
            with contextlib.suppress(Exception):
                log(f"node failed to start; tails of its logs in {self.state_dir}")
            self.close()
            raise
        for name, ref in (
            ("image", self.image),
            ("app-image", self.app_image),
            ("clientgo-image", self.clientgo_image),
            ("pause-image", refs["pause"]),
        ):
            (self.state_dir / name).write_text(ref + "\n")
        self.start_seconds = time.monotonic() - started
        log(f"node {NODE_NAME} Ready in {self.start_seconds:.1f}s")
        return self

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        down(self.state_dir, remove_dir=False)
        self.api.close()  # etcd and kube-apiserver, when this process started them
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- steps

    def _save_state(self) -> None:
        (self.state_dir / "node.json").write_text(
            json.dumps(
                {
                    "pids": {name: p.pid for name, p in self.procs.items()},
                    "exes": {
                        name: str(Path(f"/proc/{p.pid}/exe").resolve())
                        for name, p in self.procs.items()
                        if p.poll() is None
                    },
                    "containerd_socket": str(self.containerd_socket),
                },
                indent=2,
            )
        )

    def _record_host(self) -> None:
        saved = {}
        for key in SYSCTLS:
            with contextlib.suppress(OSError):
                saved[key] = (Path("/proc/sys") / key).read_text().strip()
        (self.dir / "sysctls.json").write_text(json.dumps(saved, indent=2))
        tables = _run("nft", "list", "tables", check=False).stdout
        (self.dir / "nft-tables-before").write_text(tables)

    def _network(self) -> None:
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        # The Service range goes to the bridge (kube-proxy's DNAT happens before routing, but
        # should it ever not, such a packet still never leaves by the host's interface).
        _run("ip", "route", "add", SERVICE_RANGE, "dev", BRIDGE)
        cni = self.dir / "cni"
        cni.mkdir(parents=True, exist_ok=True)
        conf = {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    # The harness owns the bridge's address; isGateway would also switch on
                    # the host's ip_forward.
                    "isGateway": False,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(self.dir / "cni-ipam"),
                        "ranges": [
                            [
                                {
                                    "subnet": POD_SUBNET,
                                    "rangeStart": "10.244.0.10",
                                    "gateway": NODE_IP,
                                }
                            ]
                        ],
                        # Only the Service range, via the node: no default route in pods.
                        "routes": [{"dst": SERVICE_RANGE, "gw": NODE_IP}],
                    },
                }
            ],
        }
        (cni / "10-leader-sidecar-node.conflist").write_text(json.dumps(conf, indent=2))

    def _spawn(self, name: str, args: list[str], exe: str | None = None) -> None:
        with open(self.state_dir / f"{name}.log", "ab") as logf:
            self.procs[name] = subprocess.Popen(
                [exe or str(node_build.bin_dir() / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                preexec_fn=None if self.detached else _die_with_parent(),
            )
        self._save_state()

    def _containerd(self, refs: dict[str, str]) -> None:
        d = self.dir / "containerd"
        d.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""\
version = 2
root = {json.dumps(str(d / "root"))}
state = {json.dumps(str(d / "state"))}
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = {json.dumps(str(self.containerd_socket))}

[{cri}]
  sandbox_image = {json.dumps(refs["pause"])}
  # This VM lacks CAP_SYS_RESOURCE: without this runc fails every sandbox
  # ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = {json.dumps(str(self.dir / "runc"))}

[{cri}.cni]
  bin_dir = {json.dumps(str(CNI_BIN_DIR))}
  conf_dir = {json.dumps(str(self.dir / "cni"))}
  max_conf_num = 1

[plugins."io.containerd.internal.v1.opt"]
  path = {json.dumps(str(d / "opt"))}
"""
        (d / "config.toml").write_text(config)
        self._spawn(
            "containerd",
            ["--config", str(d / "config.toml"), "--log-level", "warn"],
            exe=shutil.which("containerd"),
        )
        deadline = time.monotonic() + 30
        while self._ctr("version", check=False).returncode != 0:
            if time.monotonic() > deadline or self.procs["containerd"].poll() is not None:
                raise NodeError(
                    "containerd did not start: " + _tail(self.state_dir / "containerd.log", 5)
                )
            time.sleep(0.2)
        t = time.monotonic()
        for name in ("pause", "sidecar", "app", "clientgo"):
            self._ctr("images", "import", str(images.archive(refs[name])))
        log(f"images imported into containerd in {time.monotonic() - t:.1f}s")

    def _ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args,
                    check=check)  # fmt: skip

    def ctr(self, *args: str) -> str:
        """Run `ctr` against the node's containerd (namespace k8s.io); returns stdout."""
        return self._ctr(*args).stdout

    def _cgroups(self) -> None:
        for hierarchy in _cgroup_hierarchies():
            path = hierarchy / CGROUP_ROOT
            path.mkdir(exist_ok=True)
            if hierarchy.name == "cpuset":  # a new v1 cpuset has no CPUs or memory nodes
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (path / f).write_text((hierarchy / f).read_text())

    def _kubelet(self) -> None:
        pki = self.state_dir / "pki"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # The host is cgroup v1 (hybrid); cgroupfs, not systemd.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "podLogsDir": str(self.dir / "pod-logs"),
            "resolvConf": "",
            "failSwapOn": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusUpdateFrequency": "4s",
            "maxPods": 50,
        }
        (self.dir / "kubelet.json").write_text(json.dumps(config, indent=2))
        (self.dir / "pod-logs").mkdir(exist_ok=True)
        self._spawn(
            "kubelet",
            [
                f"--config={self.dir / 'kubelet.json'}",
                f"--kubeconfig={self.kubeconfig}",
                f"--root-dir={self.dir / 'kubelet'}",
                f"--cert-dir={self.dir / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )

    def _kube_proxy(self) -> None:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{free_port()}",
            "metricsBindAddress": f"127.0.0.1:{free_port()}",
            "clusterCIDR": POD_SUBNET,
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Zero: leave the host's conntrack sysctls as they are.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
                "udpTimeout": "0s",
                "udpStreamTimeout": "0s",
            },
        }
        (self.dir / "kube-proxy.json").write_text(json.dumps(config, indent=2))
        self._spawn("kube-proxy", [f"--config={self.dir / 'kube-proxy.json'}"])

    def _control_plane(self) -> None:
        pki = self.state_dir / "pki"
        common = [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]
        self._spawn("kube-scheduler", [*common, f"--secure-port={free_port()}"])
        self._spawn(
            "kube-controller-manager",
            [
                *common,
                f"--secure-port={free_port()}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                "--use-service-account-credentials=false",
                f"--cluster-cidr={POD_SUBNET}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                # Deployments roll quickly in tests: react at once.
                "--concurrent-deployment-syncs=5",
            ],
        )

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        checks: dict[str, Callable[[], bool]] = {
            "node Ready": self._node_ready,
            "ServiceAccount default/default": lambda: self._exists(
                "/api/v1/namespaces/default/serviceaccounts/default"
            ),
            "ConfigMap default/kube-root-ca.crt": lambda: self._exists(
                "/api/v1/namespaces/default/configmaps/kube-root-ca.crt"
            ),
        }
        for what, check in checks.items():
            while not check():
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise NodeError(
                            f"{name} exited ({proc.returncode}) before {what}: "
                            + _last_error(self.state_dir / f"{name}.log")
                        )
                if time.monotonic() > deadline:
                    raise NodeError(
                        f"no {what} after {timeout:.0f}s; kubelet says: "
                        + _last_error(self.state_dir / "kubelet.log")
                    )
                time.sleep(0.3)

    def _exists(self, path: str) -> bool:
        with contextlib.suppress(OSError):
            return self.api.api("GET", path, timeout=5)[0] == 200
        return False

    def _node_ready(self) -> bool:
        with contextlib.suppress(OSError):
            status, body = self.api.api("GET", f"/api/v1/nodes/{NODE_NAME}", timeout=5)
            if status == 200:
                return any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in body["status"].get("conditions", [])
                )
        return False


def _last_error(logfile: Path) -> str:
    """The last line of a log that looks like an error (else the last line), for one-line
    failure messages."""
    lines = _tail(logfile, 200).splitlines() or ["(no log)"]
    for line in reversed(lines):
        if line.startswith("E") or "error" in line.lower() or "fail" in line.lower():
            return line.strip()[:400]
    return lines[-1].strip()[:400]


def _cgroup_hierarchies() -> list[Path]:
    """The cgroup v1 hierarchies the kubelet uses (named ones and the empty v2 mount skipped)."""
    out = []
    for p in sorted(CGROUP_FS.iterdir()):
        if (
            p.is_dir()
            and not p.is_symlink()
            and p.name not in ("unified",)
            and (p / "cgroup.procs").exists()
        ):
            out.append(p)
    return out


# --------------------------------------------------------------------------- down


def _kill(pid: int, exe: str | None, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Signal a pid's group only if it still runs `exe` (pids get reused); wait for it."""
    try:
        if not exe or Path(f"/proc/{pid}/exe").resolve() != Path(exe):
            return
    except OSError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _cgroup_dirs(root: Path) -> list[Path]:
    """`root` and every cgroup below it, deepest first (cgroups vanish while we look: fine)."""
    out = []
    for parent, _, _ in os.walk(root, onerror=lambda e: None):
        out.append(Path(parent))
    return sorted(out, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for hierarchy in _cgroup_hierarchies():
        for d in _cgroup_dirs(hierarchy / CGROUP_ROOT):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    return pids


def _pids_with_arg(arg: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if arg.encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
    return out


def _in_pod_subnet(addr: str) -> bool:
    return ipaddress.ip_address(addr) in ipaddress.ip_network(POD_SUBNET)


def down(state_dir: Path, remove_dir: bool = True) -> None:
    """Stop the node started in `state_dir` and undo everything it did to the host: processes,
    pod network namespaces, the bridge and its route, nftables tables, cgroups, mounts, sysctls.
    Safe to run twice and after a crash (it works from fixed names, not only from node.json)."""
    state_dir = state_dir.resolve()
    ndir = state_dir / "node"
    info: Json = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((state_dir / "node.json").read_text())
    pids, exes = info.get("pids", {}), info.get("exes", {})
    # 1. node components (containerd last: its shims and containers go first).
    for name in COMPONENTS[:-1]:
        if name in pids:
            _kill(int(pids[name]), exes.get(name), wait=3)
    # 2. every container process (all live in the node's cgroups), then the shims.
    for _ in range(50):
        left = _cgroup_pids()
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    socket = info.get("containerd_socket") or str(ndir / "containerd" / "containerd.sock")
    for pid in _pids_with_arg(socket):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if "containerd" in pids:
        _kill(int(pids["containerd"]), exes.get("containerd"), wait=3)
    # 3. pod network namespaces: those with an address in the pod subnet.
    netns_dir = Path("/var/run/netns")
    if netns_dir.is_dir():
        for ns in netns_dir.iterdir():
            out = _run("ip", "-n", ns.name, "-4", "-o", "addr", check=False).stdout
            addrs = [w.split("/")[0] for w in out.split() if "/" in w and w[0].isdigit()]
            if any(_in_pod_subnet(a) for a in addrs) or (
                ns.name.startswith("cni-") and not out.strip()
            ):
                subprocess.run(["umount", str(ns)], check=False, capture_output=True)
                ns.unlink(missing_ok=True)
    # 4. the bridge, its veths and the route.
    veths = _run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout
    for line in veths.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        _run("ip", "link", "del", name, check=False)
    _run("ip", "link", "del", BRIDGE, check=False)
    _run("ip", "route", "del", SERVICE_RANGE, check=False)
    # 5. nftables: kube-proxy's tables; the kubelet's canary chains (their tables too if the
    # node created them).
    before: str | None = None
    with contextlib.suppress(OSError):
        before = (ndir / "nft-tables-before").read_text()
    existed = {tuple(line.split()[1:3]) for line in (before or "").splitlines() if line.strip()}
    for family, table in NFT_TABLES:
        listing = _run("nft", "-j", "list", "table", family, table, check=False)
        if listing.returncode != 0:
            continue
        if table == "kube-proxy" or ((family, table) not in existed and before is not None):
            _run("nft", "delete", "table", family, table, check=False)
            continue
        with contextlib.suppress(ValueError, KeyError):
            for item in json.loads(listing.stdout)["nftables"]:
                chain = item.get("chain", {}).get("name", "")
                if chain.startswith("KUBE-"):
                    _run("nft", "flush", "chain", family, table, chain, check=False)
                    _run("nft", "delete", "chain", family, table, chain, check=False)
    # 6. cgroups, deepest first.
    for hierarchy in _cgroup_hierarchies():
        for d in _cgroup_dirs(hierarchy / CGROUP_ROOT):
            with contextlib.suppress(OSError):
                d.rmdir()
    # 7. mounts below the state dir (kubelet volumes, container root filesystems, shm).
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(f"{state_dir}/")), reverse=True):
        subprocess.run(["umount", "-l", m], check=False, capture_output=True)
    # 8. host sysctls back as they were.
    with contextlib.suppress(OSError, ValueError):
        for key, value in json.loads((ndir / "sysctls.json").read_text()).items():
            path = Path("/proc/sys") / key
            with contextlib.suppress(OSError):
                if path.read_text().strip() != value:
                    path.write_text(value)
    # 9. libcni's result cache for the node's network, and the folders containerd and libcni
    # make on the host when they are left empty.
    for cached in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*"):
        cached.unlink(missing_ok=True)
    for folder in (
        "/var/lib/cni/results",
        "/var/lib/cni",
        "/run/containerd/s",
        "/run/containerd",
        "/run/netns",
    ):
        with contextlib.suppress(OSError):
            Path(folder).rmdir()
    for entry in NODE_ENTRIES:
        p = state_dir / entry
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for name in COMPONENTS:
        (state_dir / f"{name}.log").unlink(missing_ok=True)
    for pki_file in ("kubelet-client.crt", "kubelet-client.key", "kubelet-client.csr",
                     "kubelet-client.ext"):  # fmt: skip
        (state_dir / "pki" / pki_file).unlink(missing_ok=True)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(_active_path().read_text()).get("dir") == str(state_dir):
            _active_path().unlink()
    # 10. etcd and kube-apiserver, and their files.
    cluster.down(state_dir)
    if remove_dir:
        shutil.rmtree(state_dir, ignore_errors=True)


def leftovers(state_dir: Path, nft_before: str | None = None) -> list[str]:
    """What a node in `state_dir` left on the host (empty after a clean `down`)."""
    state_dir = state_dir.resolve()
    found = []
    if _run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        found.append(f"bridge {BRIDGE}")
    if SERVICE_RANGE in _run("ip", "route", "show", SERVICE_RANGE, check=False).stdout:
        found.append(f"route {SERVICE_RANGE}")
    mounts = Path("/proc/self/mountinfo").read_text()
    if f" {state_dir}/" in mounts:
        found.append(f"mounts below {state_dir}")
    found += [
        f"cgroup {h / CGROUP_ROOT}" for h in _cgroup_hierarchies() if (h / CGROUP_ROOT).exists()
    ]
    tables = _run("nft", "list", "tables", check=False).stdout
    if nft_before is not None:
        found += [f"nft {t}" for t in tables.splitlines() if t.strip() and t not in nft_before]
    elif "kube-proxy" in tables:
        found.append("nft table kube-proxy")
    netns = Path("/run/netns")
    if netns.is_dir():
        for ns in netns.iterdir():
            out = _run("ip", "-n", ns.name, "-4", "-o", "addr", check=False).stdout
            if any(
                _in_pod_subnet(w.split("/")[0]) for w in out.split() if w[:1].isdigit() and "/" in w
            ):
                found.append(f"network namespace {ns.name}")
    found += [f"process {pid}" for pid in _cgroup_pids()]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build the binaries and images (cached)")
    for name in ("up", "down"):
        sub.add_parser(name).add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "build":
        for name, ref in build().items():
            print(f"{name}\t{ref}")
    elif args.cmd == "up":
        if (args.dir / "node.json").exists():
            parser.error(f"{args.dir} already holds a node; run `down --dir {args.dir}`")
        try:
            node = Node(args.dir, detached=True).start()
        except NodeError as exc:
            print(f"node: {exc}", file=sys.stderr)
            return 1
        node.api.save()
        _active_path().write_text(
            json.dumps({"dir": str(node.state_dir), "pid": node.procs["kubelet"].pid, "cli": True})
        )
        print(
            f"node {NODE_NAME} Ready in {node.start_seconds:.1f}s\n"
            f"  export KUBECONFIG={node.kubeconfig}\n"
            f"  sidecar image: {node.image}\n"
            f"  stop: python {Path(__file__).name} down --dir {args.dir}"
        )
    else:
        down(args.dir, remove_dir=False)
        if left := leftovers(args.dir):
            print(f"node: left behind: {', '.join(left)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
