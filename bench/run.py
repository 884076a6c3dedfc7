"""leader-sidecar next to client-go's own elector, in the same run, on a real API server.

    python bench/run.py [--quick] [--json bench/results.json] [--markdown bench/results.md]

It starts the test harness's kube-apiserver + etcd (tests/kube/cluster.py; built on first use),
builds bench/clientgo (client-go's leaderelection with a LeaseLock, ReleaseOnCancel), and
measures both with the same timings (client-go's defaults: 15 s / 10 s / 2 s; --quick uses
3 s / 2 s / 0.4 s and few trials, as a smoke run):

- graceful handover: SIGTERM to the leader -> another replica tells its app it leads;
- crash failover: SIGKILL of the leader -> another leads, minus the lease duration;
- change -> subscriber: a holder change written to the Lease -> every SSE / gRPC stream of a
  follower sidecar has it (arrival minus the snapshot's observed_at, one machine's clock);
- API requests per minute in steady state, per leader and per follower, counted by the API
  server (/metrics apiserver_request_total for leases, by verb; open watches from
  apiserver_longrunning_requests);
- start -> ready, RSS after start and with 1,000 streams, idle CPU (leader, follower);
- GET /leader requests/s and p99 with the sidecar pinned to CPU 0 and wrk to CPU 1.

Leadership times are the kernel's receive times of the SSE messages (see tests/chaos/recorder.py)
and client-go's own CLOCK_MONOTONIC prints. Prints a Markdown table (both systems and the ratio)
and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.chaos.fleet import Fleet, RecordedClientGo, RecordedReplica, wait_until  # noqa: E402
from tests.chaos.gobuild import build  # noqa: E402
from tests.kube.cluster import Cluster, free_port  # noqa: E402

Json = dict[str, Any]


@dataclass(frozen=True)
class Config:
    lease: float
    renew: float
    retry: float
    trials: int
    crash_trials: int
    idle_seconds: float
    http_seconds: float
    events: int
    streams: int

    @property
    def timings(self) -> tuple[float, float, float]:
        return (self.lease, self.renew, self.retry)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values: list[float], *qs: float) -> Json:
    return {f"p{q:g}_ms": round(pct(values, q) * 1000, 2) for q in qs} | {
        "n": len(values),
        "values_ms": [round(v * 1000, 2) for v in values],
    }


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, RSS in KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return cpu, rss


class Bench:
    def __init__(self, cluster: Cluster, workdir: Path, config: Config) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.config = config
        self.clientgo = build("clientgo")
        self._namespaces = 0
        self.baseline: tuple[dict[str, float], float] | None = None
        self.violations = 0

    def namespace(self, stem: str) -> str:
        self._namespaces += 1
        name = f"bench-{stem}-{self._namespaces}"
        status, body = self.cluster.api("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
        assert status == 201, body
        return name

    @contextlib.contextmanager
    def fleet(self, stem: str) -> Iterator[Fleet]:
        fleet = Fleet(
            self.cluster,
            self.namespace(stem),
            self.workdir,
            election="bench",
            timings=self.config.timings,
        )
        try:
            yield fleet
        finally:
            fleet.stop_all()
            report = fleet.check()
            if report.violations:
                log(f"VIOLATIONS in {stem}: {report.violations}")
            self.violations += len(report.violations)

    # ------------------------------------------------------------ handover, failover

    def sidecar_failover(self, kill: bool, trials: int) -> list[float]:
        times = []
        with self.fleet("sidecar-kill" if kill else "sidecar-term") as fleet:
            fleet.start(3)
            for _ in range(trials):
                leader = fleet.wait_leader(timeout=self.config.lease * 3 + 10)
                others = [r for r in fleet.live() if r is not leader]
                sent = time.monotonic()
                if kill:
                    leader.kill()
                else:
                    leader.terminate()
                new = fleet.wait_leader(timeout=self.config.lease * 3 + 10, among=others)
                taken = new.intervals()[-1].start - sent
                times.append(taken - (self.config.lease if kill else 0.0))
                leader.wait_exit()
                fleet.replace(leader)
        return times

    def clientgo_failover(self, kill: bool, trials: int) -> list[float]:
        times = []
        with self.fleet("clientgo-kill" if kill else "clientgo-term") as fleet:
            seq = 0

            def start() -> RecordedClientGo:
                nonlocal seq
                seq += 1
                return fleet.start_clientgo(self.clientgo, [f"go-{seq}"])[0]

            electors = [start() for _ in range(3)]
            for _ in range(trials):
                leader: RecordedClientGo = wait_until(
                    lambda: _single([e for e in electors if e.leading]),
                    self.config.lease * 3 + 30,
                    "one client-go leader",
                )
                # Everyone has seen the current leader (a fresh replica polls first).
                wait_until(
                    lambda current=leader: all(_sees(e, current.name) for e in electors),  # type: ignore[misc]
                    self.config.lease * 3 + 30,
                    "all client-go replicas see the leader",
                )
                others = [e for e in electors if e is not leader]
                sent = time.monotonic()
                if kill:
                    leader.kill()
                else:
                    leader.terminate()
                new: RecordedClientGo = wait_until(
                    lambda o=others: _single([e for e in o if e.leading]),  # type: ignore[misc]
                    self.config.lease * 3 + 30,
                    "a new client-go leader",
                )
                started = new.intervals()[-1].start
                times.append(started - sent - (self.config.lease if kill else 0.0))
                leader.stop()
                electors[electors.index(leader)] = start()
        return times

    # ------------------------------------------------------------------ steady state

    def api_counts(self) -> tuple[dict[str, float], float]:
        """apiserver_request_total for leases by verb, and open lease watches."""
        status, text = self.cluster.api("GET", "/metrics")
        assert status == 200, text
        counts: dict[str, float] = {}
        watches = 0.0
        for line in str(text).splitlines():
            if line.startswith("apiserver_request_total{") and 'resource="leases"' in line:
                verb = re.search(r'verb="([A-Z]+)"', line)
                if verb:
                    counts[verb.group(1)] = counts.get(verb.group(1), 0) + float(line.split()[-1])
            elif (
                line.startswith("apiserver_longrunning_requests{")
                and 'resource="leases"' in line
                and 'verb="WATCH"' in line
            ):
                watches += float(line.split()[-1])
        return counts, watches

    def steady(self, system: str) -> Json:
        """Phase A: the leader alone; phase B: leader + 2 followers. Per minute, per replica."""
        seconds = self.config.idle_seconds
        settle = 2 * self.config.retry + 1
        if self.baseline is None:
            # The API server's own traffic on leases (its identity Lease, renewed every 10 s;
            # its lease garbage collector's watch), measured with no replica running.
            z0, watches = self.api_counts()
            time.sleep(seconds)  # the measurement window
            z1, _ = self.api_counts()
            self.baseline = ({v: z1.get(v, 0) - z0.get(v, 0) for v in z1}, watches)
        base, base_watches = self.baseline
        with self.fleet(f"{system}-steady") as fleet:
            pids: dict[str, int] = {}
            if system == "sidecar":
                leader_pid = fleet.start(1)[0].proc.pid
            else:
                first = fleet.start_clientgo(self.clientgo, ["go-a"])[0]
                first.wait_event("started_leading", timeout=self.config.lease * 3 + 30)
                leader_pid = first.proc.pid
            time.sleep(settle)
            a0, wa = self.api_counts()
            time.sleep(seconds)  # the measurement window
            a1, _ = self.api_counts()
            if system == "sidecar":
                followers = [r.proc.pid for r in fleet.start(2)]
            else:
                group = fleet.start_clientgo(self.clientgo, ["go-b", "go-c"])
                for elector in group:
                    elector.wait_event("new_leader", timeout=30)
                followers = [e.proc.pid for e in group]
            time.sleep(settle)
            b0, wb = self.api_counts()
            cpu0 = {pid: proc_stat(pid)[0] for pid in [leader_pid, *followers]}
            time.sleep(seconds)  # the measurement window
            b1, _ = self.api_counts()
            cpu1 = {pid: proc_stat(pid)[0] for pid in [leader_pid, *followers]}
            pids = {"leader": leader_pid}
        per_minute = 60 / seconds
        verbs = sorted(set(a1) | set(b1))
        leader = {v: (a1.get(v, 0) - a0.get(v, 0) - base.get(v, 0)) * per_minute for v in verbs}
        both = {v: (b1.get(v, 0) - b0.get(v, 0) - base.get(v, 0)) * per_minute for v in verbs}
        follower = {v: (both[v] - leader[v]) / 2 for v in verbs}

        def cpu(pid: int) -> float:
            return (cpu1[pid] - cpu0[pid]) / seconds * 100

        return {
            "window_s": seconds,
            "leader_requests_per_min": {v: round(n, 1) for v, n in leader.items() if n},
            "follower_requests_per_min": {v: round(n, 1) for v, n in follower.items()},
            "api_server_own_requests_per_min": {
                v: round(n * per_minute, 1) for v, n in base.items() if n
            },
            "open_watches_leader": wa - base_watches,
            "open_watches_per_follower": (wb - wa) / 2,
            "leader_cpu_percent": round(cpu(pids["leader"]), 2),
            "follower_cpu_percent": round(statistics.mean(cpu(p) for p in followers), 2),
        }

    # ------------------------------------------------------------------- footprint

    def sidecar_start(self, runs: int) -> Json:
        ready, rss = [], []
        with self.fleet("sidecar-start") as fleet:
            fleet.start(1)
            fleet.wait_leader()
            for i in range(runs):
                port = free_port()
                sent = time.monotonic()
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "sidecar",
                        "run",
                        *fleet.args(),
                        *fleet.timings,
                        "--id",
                        f"start-{i}",
                        "--http-address",
                        f"127.0.0.1:{port}",
                        "--grpc-address",
                        f"127.0.0.1:{free_port()}",
                        "--log-format",
                        "json",
                    ],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={k: v for k, v in os.environ.items() if not k.startswith("LEADER_")},
                )
                try:
                    while not _ready(port):
                        assert proc.poll() is None, "the sidecar exited"
                        assert time.monotonic() - sent < 30, "not ready in 30 s"
                        time.sleep(0.002)
                    ready.append(time.monotonic() - sent)
                    time.sleep(1.0)  # let start-up garbage settle before reading RSS
                    rss.append(proc_stat(proc.pid)[1] / 1024)
                finally:
                    proc.terminate()
                    proc.wait(10)
        return {"ready": summary_ms(ready, 50, 90), "rss_mib": round(statistics.median(rss), 1)}

    def clientgo_start(self, runs: int) -> Json:
        ready, rss = [], []
        with self.fleet("clientgo-start") as fleet:
            leader = fleet.start_clientgo(self.clientgo, ["go-leader"])[0]
            leader.wait_event("started_leading", timeout=30)
            for i in range(runs):
                sent = time.monotonic()
                elector = fleet.start_clientgo(self.clientgo, [f"go-start-{i}"])[0]
                elector.wait_event("new_leader", timeout=30)
                ready.append(time.monotonic() - sent)
                time.sleep(1.0)
                rss.append(proc_stat(elector.proc.pid)[1] / 1024)
                elector.stop()
        return {"ready": summary_ms(ready, 50, 90), "rss_mib": round(statistics.median(rss), 1)}

    # ------------------------------------------------- change -> subscribers, streams

    def subscribers(self, sse: int, grpc: int, events: int) -> Json:
        """A follower sidecar with `sse` + `grpc` streams; holder changes written to the Lease."""
        from bench.grpc_fanout import subscriber_main
        from bench.subscribers import sse_subscriber_main

        ctx = multiprocessing.get_context("spawn")
        result: Json = {"sse_streams": sse, "grpc_streams": grpc}
        with self.fleet(f"subscribers-{sse}-{grpc}") as fleet:
            path = (
                f"/apis/coordination.k8s.io/v1/namespaces/{fleet.namespace}/leases/"
                f"{fleet.lease_name()}"
            )
            self._ghost(path, "ghost-0", create=True)
            [sidecar] = fleet.start(1)
            grpc_address = _grpc_address(sidecar)
            _, rss_before = proc_stat(sidecar.proc.pid)
            workers: list[tuple[str, Any, Connection]] = []
            for kind, count in (("sse", sse), ("grpc", grpc)):
                if not count:
                    continue
                ours, theirs = ctx.Pipe()
                target: Callable[..., None]
                where: int | str
                if kind == "sse":
                    target, where = sse_subscriber_main, sidecar.port
                else:
                    target, where = subscriber_main, grpc_address
                worker = ctx.Process(target=target, args=(where, count, theirs))
                worker.start()
                assert ours.poll(120), f"{kind} subscribers did not connect"
                assert ours.recv() == "connected"
                workers.append((kind, worker, ours))
            time.sleep(1.0)
            _, rss_after = proc_stat(sidecar.proc.pid)
            result["rss_mib_before_streams"] = round(rss_before / 1024, 1)
            result["rss_mib_with_streams"] = round(rss_after / 1024, 1)
            latencies: dict[str, list[float]] = {kind: [] for kind, _, _ in workers}
            for i in range(events):
                self._ghost(path, f"ghost-{(i + 1) % 2}")
                for kind, _, pipe in workers:
                    assert pipe.poll(30), f"{kind}: event {i} not delivered to every stream"
                    _revision, last, _median = pipe.recv()
                    latencies[kind].append(last)
                time.sleep(0.05)  # let the previous event's tail settle
            for _, worker, pipe in workers:
                pipe.send("stop")
                worker.join(20)
                if worker.is_alive():
                    worker.kill()
        for kind, values in latencies.items():
            result[kind] = summary_ms(values, 50, 99)
        return result

    def _ghost(self, path: str, holder: str, create: bool = False) -> None:
        """Write a foreign holder with a long lease: every follower just reports the change."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {
            "holderIdentity": holder,
            "leaseDurationSeconds": 3600,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        }
        if create:
            name = path.rsplit("/", 1)[1]
            status, body = self.cluster.api(
                "POST", path.rsplit("/", 1)[0], {"metadata": {"name": name}, "spec": spec}
            )
            assert status == 201, body
            return
        status, lease = self.cluster.api("GET", path)
        spec["leaseTransitions"] = lease["spec"]["leaseTransitions"] + 1
        lease["spec"] = spec
        status, body = self.cluster.api("PUT", path, lease)
        assert status == 200, body

    # ------------------------------------------------------------------ HTTP load

    def http_load(self) -> Json:
        wrk = shutil.which("wrk")
        if not wrk:
            return {"skipped": "wrk not installed (apt-get install wrk)"}
        out: Json = {"cpus": "sidecar on CPU 0, wrk on CPU 1"}
        with self.fleet("http") as fleet:
            [sidecar] = fleet.start(1)
            subprocess.run(
                ["taskset", "-a", "-cp", "0", str(sidecar.proc.pid)],
                check=True,
                capture_output=True,
            )
            url = f"http://127.0.0.1:{sidecar.port}/leader"
            for connections in (50, 1):
                seconds = max(2, int(self.config.http_seconds))
                run = subprocess.run(
                    [
                        "taskset",
                        "-c",
                        "1",
                        wrk,
                        "-t1",
                        f"-c{connections}",
                        f"-d{seconds}s",
                        "--latency",
                        url,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                out[f"connections_{connections}"] = _parse_wrk(run.stdout)
        return out


def _single(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else None


def _sees(elector: RecordedClientGo, leader: str) -> bool:
    with elector._changed:
        return (
            any(e["event"] == "new_leader" and e.get("leader") == leader for e in elector.events)
            or elector.name == leader
        )


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")  # loopback only
            return sock.recv(64).split(b"\r\n", 1)[0].endswith(b" 200 OK")
    except OSError:
        return False


def _grpc_address(sidecar: RecordedReplica) -> str:
    for entry in sidecar.logs:
        if entry.get("event") == "started" and entry.get("grpc"):
            return str(entry["grpc"])
    raise AssertionError("no gRPC address in the started log line")


def _parse_wrk(text: str) -> Json:
    def seconds(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
        return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    return {
        "requests_per_s": round(rps),
        "p50_ms": round(seconds(p50.group(1)) * 1000, 3) if p50 else None,
        "p99_ms": round(seconds(p99.group(1)) * 1000, 3) if p99 else None,
        "errors": "Non-2xx" in text or "Socket errors" in text,
    }


# ------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def _fmt(value: Any, unit: str = "") -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}" if abs(value) >= 10 else f"{value:.2f}{unit}"
    return f"{value}{unit}"


def _ratio(ls: Any, cg: Any) -> str:
    if isinstance(ls, int | float) and isinstance(cg, int | float) and ls > 0:
        return f"{cg / ls:.1f}x"
    return ""


def table(result: Json) -> str:
    s, c = result["leader_sidecar"], result["client_go"]
    rows: list[tuple[str, Any, Any, str]] = []

    def pair(label: str, a: Json, b: Json | None, key: str, unit: str, bar: str = "") -> None:
        rows.append((label, _fmt(a.get(key), unit), _fmt(b.get(key), unit) if b else "n/a", bar))
        ratios.append(_ratio(a.get(key), b.get(key) if b else None))

    ratios: list[str] = []
    pair("graceful handover p50", s["handover"], c["handover"], "p50_ms", " ms", "≤ 100 ms")
    pair("graceful handover p90", s["handover"], c["handover"], "p90_ms", " ms")
    pair("crash failover - lease p50", s["failover"], c["failover"], "p50_ms", " ms", "≤ 500 ms")
    pair("crash failover - lease p90", s["failover"], c["failover"], "p90_ms", " ms", "≤ 500 ms")
    small, large = s["subscribers_small"], s["subscribers_large"]
    for kind, sub, label, bar in (
        ("sse", small, "change → 10 SSE streams", "p99 ≤ 5 ms"),
        ("grpc", small, "change → 10 gRPC streams", "p99 ≤ 5 ms"),
        ("grpc", large, f"change → {large['grpc_streams']} gRPC streams", "p99 ≤ 50 ms"),
    ):
        for q in ("p50", "p99"):
            rows.append((f"{label} {q}", _fmt(sub[kind][f"{q}_ms"], " ms"), "n/a", bar))
            ratios.append("")
    for who in ("leader", "follower"):
        for system, data in (("ls", s["steady"]), ("cg", c["steady"])):
            del system, data
        ls_req = s["steady"][f"{who}_requests_per_min"]
        cg_req = c["steady"][f"{who}_requests_per_min"]
        rows.append(
            (
                f"API requests/min per {who} (steady)",
                _verbs(ls_req),
                _verbs(cg_req),
                "follower: 0 polls (1 watch)" if who == "follower" else "1 write per retry",
            )
        )
        ratios.append(_ratio(sum(ls_req.values()), sum(cg_req.values())))
    rows.append(
        (
            "open watches per follower",
            _fmt(s["steady"]["open_watches_per_follower"]),
            _fmt(c["steady"]["open_watches_per_follower"]),
            "1",
        )
    )
    ratios.append("")
    pair("start → ready p50", s["start"]["ready"], c["start"]["ready"], "p50_ms", " ms", "≤ 1.5 s")
    pair("RSS after start", s["start"], c["start"], "rss_mib", " MiB", "≤ 60 MB")
    rows.append(
        (
            f"RSS with {large['grpc_streams']} gRPC streams",
            _fmt(large["rss_mib_with_streams"], " MiB"),
            "n/a",
            "",
        )
    )
    ratios.append("")
    pair("idle CPU, leader", s["steady"], c["steady"], "leader_cpu_percent", " %", "< 1 %")
    pair("idle CPU, follower", s["steady"], c["steady"], "follower_cpu_percent", " %", "< 1 %")
    http = s["http"]
    for conns in (50, 1):
        data = http.get(f"connections_{conns}")
        if data:
            rows.append(
                (
                    f"GET /leader, {conns} conn. (1 core)",
                    f"{data['requests_per_s']:,} req/s, p99 {data['p99_ms']} ms",
                    "n/a",
                    "≥ 8,000 req/s" if conns == 50 else "",
                )
            )
            ratios.append("")
    lines = [
        "| metric | leader-sidecar | client-go | client-go / leader-sidecar "
        "| bar (the project's own target) |",
        "|---|---|---|---|---|",
    ]
    for (label, a, b, bar), ratio in zip(rows, ratios, strict=True):
        lines.append(f"| {label} | {a} | {b} | {ratio} | {bar} |")
    return "\n".join(lines)


def _verbs(counts: dict[str, float]) -> str:
    # WATCH is counted when a watch ends (the server closes them every ~5 min), so it shows in
    # a window now and then: open watches are reported on their own row instead. Differences
    # of windows below one request per minute are noise.
    shown = {v: n for v, n in counts.items() if v != "WATCH" and n >= 1.0}
    if not shown:
        return "0"
    return ", ".join(f"{n:.1f} {v}" for v, n in sorted(shown.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timings, few trials")
    parser.add_argument("--lease-duration", type=float)
    parser.add_argument("--renew-deadline", type=float)
    parser.add_argument("--retry-period", type=float)
    parser.add_argument("--trials", type=int, help="graceful handovers (default 20)")
    parser.add_argument("--crash-trials", type=int, help="crash failovers (default 20)")
    parser.add_argument("--idle-seconds", type=float, help="steady-state window (default 60)")
    parser.add_argument("--http-seconds", type=float, help="wrk duration (default 10)")
    parser.add_argument("--events", type=int, help="changes for subscriber latency (100)")
    parser.add_argument("--streams", type=int, help="streams of the large case (1000)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results.json")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--table", type=Path, metavar="JSON", help="only print the table of a run")
    parser.add_argument(
        "--shards-only", action="store_true", help="only the shard bench (bench/shards.py)"
    )
    args = parser.parse_args()
    if args.shards_only:
        return shards_only(args)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    quick = args.quick
    defaults = (
        (3.0, 2.0, 0.4, 5, 3, 5.0, 3.0, 20, 1000)
        if quick
        else (15.0, 10.0, 2.0, 20, 20, 60.0, 10.0, 100, 1000)
    )
    given = (
        args.lease_duration,
        args.renew_deadline,
        args.retry_period,
        args.trials,
        args.crash_trials,
        args.idle_seconds,
        args.http_seconds,
        args.events,
        args.streams,
    )
    lease, renew, retry, trials, crash, idle, http, events, streams = (
        g if g is not None else d for g, d in zip(given, defaults, strict=True)
    )
    config = Config(
        float(lease),
        float(renew),
        float(retry),
        int(trials),
        int(crash),
        float(idle),
        float(http),
        int(events),
        int(streams),
    )
    log(f"{'quick' if quick else 'full'} run: {config}")
    started = time.monotonic()
    result: Json = {
        "machine": machine(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": config.__dict__,
        "load_average_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="leader-sidecar-bench.") as tmp:
        workdir = Path(tmp)
        with Cluster(workdir / "kube") as cluster:
            bench = Bench(cluster, workdir, config)
            s: Json = {}
            c: Json = {}
            log("start -> ready")
            s["start"] = bench.sidecar_start(3 if quick else 7)
            c["start"] = bench.clientgo_start(3 if quick else 7)
            log("graceful handover")
            s["handover"] = summary_ms(bench.sidecar_failover(False, config.trials), 50, 90)
            c["handover"] = summary_ms(bench.clientgo_failover(False, config.trials), 50, 90)
            log("crash failover")
            s["failover"] = summary_ms(bench.sidecar_failover(True, config.crash_trials), 50, 90)
            c["failover"] = summary_ms(bench.clientgo_failover(True, config.crash_trials), 50, 90)
            log("change -> subscribers")
            s["subscribers_small"] = bench.subscribers(10, 10, config.events)
            s["subscribers_large"] = bench.subscribers(
                0, config.streams, max(10, config.events // 2)
            )
            log("steady state: API requests, idle CPU")
            s["steady"] = bench.steady("sidecar")
            c["steady"] = bench.steady("clientgo")
            log("GET /leader load")
            s["http"] = bench.http_load()
            result["leader_sidecar"], result["client_go"] = s, c
            result["violations"] = bench.violations
    result["seconds"] = round(time.monotonic() - started)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    markdown = table(result)
    timing = f"{config.lease:g} s / {config.renew:g} s / {config.retry:g} s"
    header = (
        f"Machine: {result['machine']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in result['load_average_at_start'])}.\n"
        f"Timings (lease / renew deadline / retry): {timing}; {config.trials} graceful and "
        f"{config.crash_trials} crash trials per system; {config.idle_seconds:g} s idle window.\n"
    )
    print(header + "\n" + markdown)
    if args.markdown:
        args.markdown.write_text(header + "\n" + markdown + "\n")
    log(f"done in {result['seconds']} s; JSON in {args.json}")
    return 1 if result["violations"] else 0


def shards_only(args: argparse.Namespace) -> int:
    """32 shards over 5 replicas: rebalance figures, writes, RSS (see bench/shards.py)."""
    from bench.shards import shard_bench, shard_table

    timings = (
        args.lease_duration or (3.0 if args.quick else 15.0),
        args.renew_deadline or (2.0 if args.quick else 10.0),
        args.retry_period or (0.4 if args.quick else 2.0),
    )
    with (
        tempfile.TemporaryDirectory(prefix="leader-sidecar-bench.") as tmp,
        Cluster(Path(tmp) / "kube") as cluster,
    ):
        status, body = cluster.api(
            "POST", "/api/v1/namespaces", {"metadata": {"name": "bench-shards"}}
        )
        assert status == 201, body
        log(f"shards: timings {timings}")
        figures = shard_bench(
            cluster,
            "bench-shards",
            timings,
            rounds=1 if args.quick else 2,
            idle_seconds=args.idle_seconds or (5.0 if args.quick else 30.0),
        )
    figures["machine"] = machine()
    figures["load_average"] = os.getloadavg()
    out = (
        args.json
        if args.json != REPO / "bench" / "results.json"
        else REPO / "bench" / "shards.json"
    )
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(shard_table(figures))
    return 1 if figures["double_ownerships"] else 0


if __name__ == "__main__":
    sys.exit(main())
