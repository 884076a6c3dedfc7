"""Server-Sent Events subscribers for bench/run.py, in their own process (like the gRPC ones of
bench/grpc_fanout.py, whose `subscriber_main` run.py reuses for gRPC).

For every revision that all `count` streams received, it sends (revision, max latency, median
latency) over the pipe, where latency = arrival (wall clock) - the snapshot's `observed_at` (the
sidecar's wall clock when the elector published it: one machine, one clock).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection


def sse_subscriber_main(port: int, count: int, pipe: Connection) -> None:
    asyncio.run(_subscribe(port, count, pipe))


def _wall(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


async def _subscribe(port: int, count: int, pipe: Connection) -> None:
    import aiohttp

    seen: dict[int, list[float]] = {}
    connected = 0
    everyone = asyncio.Event()
    url = f"http://127.0.0.1:{port}/leader?watch=true"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def stream() -> None:
            nonlocal connected
            async with session.get(url) as response:
                initial = True
                revision = 0
                async for raw in response.content:
                    now = time.time()
                    line = raw.rstrip(b"\n")
                    if line.startswith(b"id: "):
                        revision = int(line[4:])
                    elif line.startswith(b"data: "):
                        if initial:
                            initial = False
                            connected += 1
                            if connected == count:
                                everyone.set()
                            continue
                        latency = now - _wall(json.loads(line[6:])["observed_at"])
                        got = seen.setdefault(revision, [])
                        got.append(latency)
                        if len(got) == count:
                            pipe.send((revision, max(got), statistics.median(got)))
                            del seen[revision]

        tasks = [asyncio.create_task(stream()) for _ in range(count)]
        await everyone.wait()
        pipe.send("connected")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
