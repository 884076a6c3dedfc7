"""A fleet of recorded replicas on one Lease of the real API server, for the chaos suite and soak.

Every replica ever started stays a member of the fleet, so the checker sees each process's
whole history, including the ones that were killed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.chaos.recorder import ClientGoReplica, Member, Replica, Report, check
from tests.kube.cluster import Cluster

# Short timings, client-go's ratios: the leader stops claiming 1 s before anyone may take over.
LEASE, RENEW, RETRY = 3.0, 2.0, 0.4

# One condition for every replica of every fleet: any recorded event or exit wakes the waiters,
# so tests wait for states across replicas without polling.
EVENTS = threading.Condition()


class RecordedReplica(Replica):
    """A Replica whose events notify the shared EVENTS condition."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.env = env
        super().__init__(name, args, env)

    def wait_exit(self, timeout: float = 20) -> int:
        """Wait for the process to exit; if it hangs, fail with its log and its Python stacks
        (py-spy, when installed), then kill it."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stacks = "(install py-spy for the stacks)"
            if shutil.which("py-spy"):
                dump = subprocess.run(
                    ["py-spy", "dump", "--pid", str(self.proc.pid)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                stacks = dump.stdout + dump.stderr
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s\n{self.log_text()}\n{stacks}"
            ) from None

    @property
    def _changed(self) -> threading.Condition:
        return EVENTS

    @_changed.setter
    def _changed(self, _: threading.Condition) -> None:
        pass  # Sidecar.__init__ assigns its own; all replicas share EVENTS instead


class RecordedClientGo(ClientGoReplica):
    @property
    def _changed(self) -> threading.Condition:
        return EVENTS

    @_changed.setter
    def _changed(self, _: threading.Condition) -> None:
        pass


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Wait (on recorded events, with a deadline) until `predicate()` is truthy; return it."""
    with EVENTS:
        result = EVENTS.wait_for(predicate, timeout)
    if not result:
        raise AssertionError(f"not within {timeout:g} s: {what}")
    return result


def poll(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll state that raises no event (the API server's) until `predicate()` is truthy."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        with EVENTS:
            EVENTS.wait(every)
    return result


def write_kubeconfig(
    cluster: Cluster, path: Path, *, server: str | None = None, insecure: bool = False
) -> Path:
    """A kubeconfig for the admin user, optionally through a proxy or without TLS verification
    (only for processes whose wall clock we move back past the test CA's validity start)."""
    tls = (
        "    insecure-skip-tls-verify: true\n"
        if insecure
        else f"    certificate-authority: {json.dumps(str(cluster.ca_file))}\n"
    )
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: test\n  cluster:\n    server: {json.dumps(server or cluster.server)}\n"
        f"{tls}"
        f"users:\n- name: admin\n  user:\n    token: {json.dumps(cluster.admin_token)}\n"
        "contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n"
        "current-context: test\n"
    )
    path.chmod(0o600)
    return path


class Fleet:
    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        workdir: Path,
        election: str = "chaos",
        timings: tuple[float, float, float] = (LEASE, RENEW, RETRY),
    ) -> None:
        self.lease_duration, self.renew_deadline, self.retry_period = timings
        self.timings = [
            f"--{flag}={seconds:g}s"
            for flag, seconds in zip(
                ("lease-duration", "renew-deadline", "retry-period"), timings, strict=True
            )
        ]
        self.cluster = cluster
        self.namespace = namespace
        self.workdir = workdir
        self.election = election
        self.members: list[Member] = []
        self.replicas: list[RecordedReplica] = []
        self.checked_in_test = False  # the test asserts safety itself (e.g. an expected failure)
        self._seq = 0

    # ---------------------------------------------------------------- processes

    def args(self, kubeconfig: Path | None = None) -> list[str]:
        return [
            "--kubeconfig",
            str(kubeconfig or self.cluster.kubeconfig),
            "--namespace",
            self.namespace,
            "--election",
            self.election,
        ]

    def start(
        self,
        count: int = 1,
        *,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        names: list[str] | None = None,
        wait: bool = True,
    ) -> list[RecordedReplica]:
        """Start `count` replicas (`args` replaces the default kubeconfig/namespace/election)."""
        if names is None:
            names = [f"r{self._seq + i}" for i in range(count)]
            self._seq += count
        group = [
            RecordedReplica(name, [*(args or self.args()), *self.timings], env) for name in names
        ]
        self.replicas.extend(group)
        self.members.extend(group)
        if wait:
            for replica in group:
                replica.wait_started()
                self.wait_observed(replica)
        return group

    def start_clientgo(self, binary: Path, names: list[str]) -> list[RecordedClientGo]:
        lease_name = self.lease_name()
        group = [
            RecordedClientGo(
                binary,
                name,
                [
                    "--kubeconfig",
                    str(self.cluster.kubeconfig),
                    "--namespace",
                    self.namespace,
                    "--lease-name",
                    lease_name,
                    *self.timings,
                ],
            )
            for name in names
        ]
        self.members.extend(group)
        return group

    def wait_observed(self, replica: RecordedReplica, timeout: float = 20) -> None:
        wait_until(
            lambda: (
                replica.latest.get("state") in ("leader", "follower")
                or replica.proc.poll() is not None
            ),
            timeout,
            f"{replica.name} observes the Lease",
        )

    def live(self) -> list[RecordedReplica]:
        return [r for r in self.replicas if r.proc.poll() is None]

    def replace(self, replica: RecordedReplica, *, same_name: bool = False) -> RecordedReplica:
        """Start a new process in the place of `replica` (which must have exited)."""
        assert replica.proc.poll() is not None
        names = [replica.name] if same_name else None
        return self.start(args=_without_timings(replica.args), env=replica.env, names=names)[0]

    def stop_all(self) -> None:
        """SIGTERM every live member at once, then wait for each (SIGKILL after 10 s)."""
        for member in self.members:
            if _alive(member):
                member.terminate()
        for member in self.members:
            member.stop()

    # ---------------------------------------------------------------- observing

    def leaders(self) -> list[Member]:
        return [m for m in self.members if getattr(m, "leading", False) and _alive(m)]

    def wait_leader(
        self, timeout: float = 30, among: list[RecordedReplica] | None = None
    ) -> RecordedReplica:
        """Wait until exactly one replica leads and every replica in `among` (default: the live
        ones) names it; return it."""

        def one() -> RecordedReplica | None:
            group = among if among is not None else self.live()
            leading = [r for r in group if r.leading and r.proc.poll() is None]
            if len(leading) != 1 or len(self.leaders()) != 1:
                return None
            name = leading[0].name
            agree = all(r.latest.get("name") == name for r in group if r.proc.poll() is None)
            return leading[0] if agree else None

        result: RecordedReplica = wait_until(one, timeout, "one leader that all replicas name")
        return result

    def lease_name(self) -> str:
        from sidecar.naming import lease_name

        return lease_name("leader-sidecar", self.election)

    def lease(self) -> dict[str, Any]:
        status, body = self.cluster.api(
            "GET",
            f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.lease_name()}",
        )
        assert status == 200, body
        return dict(body)

    def watch_lease(self, seconds: float, every: float = 0.1) -> list[dict[str, Any]]:
        """The distinct Lease specs seen while polling it for `seconds` (an observation window:
        the point is what does or does not happen in it)."""
        seen: list[dict[str, Any]] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            spec = self.lease()["spec"]
            if not seen or spec != seen[-1]:
                seen.append(spec)
            with EVENTS:
                EVENTS.wait(every)
        return seen

    def check(self) -> Report:
        return check(self.members)


def _alive(member: Member) -> bool:
    proc = getattr(member, "proc", None)
    return proc is not None and proc.poll() is None


def _without_timings(args: list[str]) -> list[str]:
    flags = ("--lease-duration=", "--renew-deadline=", "--retry-period=")
    return [arg for arg in args if not arg.startswith(flags)]
