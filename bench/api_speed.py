"""The app-facing API against bare servers, measured in the same run (ratios, since this
machine's absolute speed varies with its load), for each option tried.

    python bench/api_speed.py [--http-seconds 5] [--rounds 3] [--streams 1000] [--events 20]
                              [--json bench/api_speed.json] [--markdown PATH]

- `GET /leader`: the sidecar's real aiohttp app (sidecar.api.http.HttpApi, with its guard, and
  `valid_for_ms` spliced into pre-serialised JSON per answer) against a bare aiohttp handler
  returning fixed bytes; `wrk` with 50 and 1 kept-alive connections. Server pinned to CPU 0,
  wrk to CPU 1. Rounds alternate bare and sidecar; the best round of each counts.
- change -> 1,000 gRPC Watch streams (bench/grpc_fanout.py): GrpcApi against a bare grpc.aio
  server that writes the same pre-serialised bytes to every stream.
- Options, each in fresh processes: the default asyncio loop, uvloop, gc.freeze() after
  start-up, and both.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPTIONS: dict[str, list[str]] = {
    "asyncio": [],
    "uvloop": ["--loop", "uvloop"],
    "asyncio + gc.freeze": ["--gc-freeze"],
    "uvloop + gc.freeze": ["--loop", "uvloop", "--gc-freeze"],
    "gRPC on its own thread": ["--grpc-thread"],
}
HTTP_OPTIONS = ("asyncio", "uvloop", "asyncio + gc.freeze", "uvloop + gc.freeze")


# ----------------------------------------------------------------------------- servers


def serve(kind: str, loop: str, freeze: bool) -> None:
    """Run one HTTP server (`kind` sidecar or bare) on a free port; print the port."""
    if loop == "uvloop":
        import uvloop

        uvloop.install()
    asyncio.run(_serve(kind, freeze))


async def _serve(kind: str, freeze: bool) -> None:
    from datetime import UTC, datetime, timedelta

    from aiohttp import web

    from sidecar.api.http import HttpApi
    from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role

    now = datetime.now(UTC)
    leader = Leadership(
        identity="bench-a",
        role=Role.LEADER,
        leader="bench-a",
        lease=LeaseInfo("leader-sidecar-0123456789abcdef", "default", 3, now, now, 15),
        observed_at=now,
        valid_until=now + timedelta(hours=1),
        valid_until_monotonic=time.monotonic() + 3600,
        fencing_token=3,
        ready=True,
    )
    if kind == "sidecar":

        class Control:
            def alive(self) -> bool:
                return True

            async def resign(self) -> Any:
                return None

        runner: web.BaseRunner = web.ServerRunner(HttpApi(Broadcaster(leader), Control()).server())
    else:
        body = leader.to_json()

        async def handler(request: web.Request) -> web.Response:
            return web.Response(
                body=body, content_type="application/json", headers={"Cache-Control": "no-cache"}
            )

        app = web.Application()
        app.router.add_get("/leader", handler)
        runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    if freeze:
        gc.collect()
        gc.freeze()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------------------ drivers


def wrk(port: int, connections: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "1",
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            f"http://127.0.0.1:{port}/leader",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert p99 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"requests_per_s": round(rate), "p99_ms": round(float(p99.group(1)) * scale, 2)}


def http_round(kind: str, option: list[str], seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "serve", kind, *option]
    server = subprocess.Popen(
        ["taskset", "-c", "0", *cmd],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        wrk(port, 50, 1)  # warm up
        return {f"c{c}": wrk(port, c, seconds) for c in (50, 1)}
    finally:
        server.kill()
        server.wait()


def fanout(server: str, option: list[str], streams: int, events: int) -> dict[str, Any]:
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "grpc_fanout.py"),
            "--subscribers",
            str(streams),
            "--events",
            str(events),
            "--server",
            server,
            "--json",
            *option,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def memory(streams: int) -> dict[str, Any]:
    """RSS of a real sidecar (local backend) at start, then with `streams` SSE streams, then
    with `streams` gRPC streams: the cost per open stream (for --max-streams)."""
    import tempfile

    from tests.e2e.sidecars import Sidecar

    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o700)
        args = ["--backend", "local", "--local-dir", tmp, "--election", "memory"]
        sidecar = Sidecar("memory", [*args, "--max-streams", str(streams + 10)]).wait_started()
        try:
            sidecar.wait_for(lambda s: bool(s.get("is_leader")))
            time.sleep(1)
            start = rss_kib(sidecar.proc.pid)
            out: dict[str, Any] = {"rss_at_start_mib": round(start / 1024, 1)}
            grpc_address = next(e for e in sidecar.logs if e.get("event") == "started")["grpc"]
            for kind in ("sse", "grpc"):
                base = rss_kib(sidecar.proc.pid)
                held = _hold(kind, sidecar.port, str(grpc_address), streams)
                try:
                    added = rss_kib(sidecar.proc.pid) - base
                finally:
                    held()
                out[f"{kind}_kib_per_stream"] = round(added / streams, 1)
                time.sleep(1)
            return out
        finally:
            sidecar.stop()


def _hold(kind: str, port: int, grpc_address: str, count: int) -> Any:
    """Open `count` streams from a thread with its own loop; returns a closer."""
    import threading

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    tasks: list[asyncio.Task[None]] = []
    opened = threading.Semaphore(0)

    async def sse(session: Any) -> None:
        async with session.get(f"http://127.0.0.1:{port}/leader?watch=true") as response:
            await response.content.readline()
            opened.release()
            async for _ in response.content:
                pass

    async def rpc(channel: Any) -> None:
        from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb

        watch = channel.unary_stream(
            "/leadersidecar.v1.LeaderElection/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.Leadership.FromString,
        )
        first = True
        async for _ in watch(pb.WatchRequest()):
            if first:
                opened.release()
                first = False

    async def start() -> list[Any]:
        import aiohttp
        import grpc

        if kind == "sse":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            tasks.extend(asyncio.create_task(sse(session)) for _ in range(count))
            return [session]
        channels = [grpc.aio.insecure_channel(grpc_address) for _ in range(-(-count // 100))]
        tasks.extend(asyncio.create_task(rpc(channels[i // 100])) for i in range(count))
        return channels

    resources = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    for _ in range(count):
        assert opened.acquire(timeout=60), "a stream did not open"
    time.sleep(1)

    def close() -> None:
        async def stop() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for resource in resources:
                await resource.close()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)

    return close


def best(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return max((r[key] for r in rounds), key=lambda r: r["requests_per_s"])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        parser = argparse.ArgumentParser()
        parser.add_argument("serve")
        parser.add_argument("kind", choices=("sidecar", "bare"))
        parser.add_argument("--loop", default="asyncio")
        parser.add_argument("--gc-freeze", action="store_true")
        args = parser.parse_args()
        serve(args.kind, args.loop, args.gc_freeze)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-grpc", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "api_speed.json")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    chosen = [name for name in OPTIONS if name in args.options.split(",")]
    result: dict[str, Any] = {
        "load_average_at_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "http": {},
        "grpc": {},
        "memory": {},
    }
    if not args.skip_memory:
        result["memory"] = memory(args.streams)
        print(f"memory: {json.dumps(result['memory'])}", file=sys.stderr, flush=True)
    if not args.skip_http:
        if shutil.which("wrk") is None:
            print("wrk is not installed (apt-get install wrk): HTTP skipped", file=sys.stderr)
        else:
            for name in (n for n in chosen if n in HTTP_OPTIONS):
                rounds: dict[str, list[dict[str, Any]]] = {"bare": [], "sidecar": []}
                for _ in range(args.rounds):
                    for kind in ("bare", "sidecar"):
                        rounds[kind].append(http_round(kind, OPTIONS[name], args.http_seconds))
                row = {kind: {c: best(r, c) for c in ("c50", "c1")} for kind, r in rounds.items()}
                for c in ("c50", "c1"):
                    row[f"ratio_{c}"] = round(
                        row["sidecar"][c]["requests_per_s"] / row["bare"][c]["requests_per_s"], 3
                    )
                result["http"][name] = row
                print(f"http {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    if not args.skip_grpc:
        for name in chosen:
            row = {}
            for server in ("bare", "sidecar"):
                option = OPTIONS[name]
                if server == "bare" and "--grpc-thread" in option:
                    option = []  # the floor stays the plain bare server
                row[server] = fanout(server, option, args.streams, args.events)
            row["ratio_p99"] = round(
                row["sidecar"]["received_p99_ms"] / row["bare"]["received_p99_ms"], 2
            )
            result["grpc"][name] = row
            print(f"grpc {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    markdown = table(result, args.streams)
    print(markdown)
    if args.markdown:
        args.markdown.write_text(markdown + "\n")
    return 0


def table(result: dict[str, Any], streams: int) -> str:
    lines = [
        f"Load average at start: {', '.join(f'{x:.1f}' for x in result['load_average_at_start'])}",
        "",
        "| option | `GET /leader` 50 conn.: sidecar / bare req/s (ratio) | 1 conn. (ratio) "
        f"| change → {streams} gRPC streams, received p50 / p99: sidecar / bare ms |",
        "|---|---|---|---|",
    ]
    for name in OPTIONS:
        http, rpc = result["http"].get(name), result["grpc"].get(name)
        if not http and not rpc:
            continue
        cells = [name]
        for c in ("c50", "c1"):
            if http:
                s, b = http["sidecar"][c]["requests_per_s"], http["bare"][c]["requests_per_s"]
                cells.append(f"{s:,} / {b:,} ({http[f'ratio_{c}']:.2f}x)")
            else:
                cells.append("-")
        if rpc:
            s, b = rpc["sidecar"], rpc["bare"]
            cells.append(
                f"{s['received_p50_ms']:.0f} / {s['received_p99_ms']:.0f} vs "
                f"{b['received_p50_ms']:.0f} / {b['received_p99_ms']:.0f}"
            )
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    memory = result.get("memory")
    if memory:
        lines += [
            "",
            f"RSS at start {memory['rss_at_start_mib']} MiB; per open stream: SSE "
            f"{memory['sse_kib_per_stream']} KiB, gRPC {memory['grpc_kib_per_stream']} KiB.",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
