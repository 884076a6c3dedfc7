"""gRPC Watch fan-out: how long from a published change until every subscriber has it.

    python bench/grpc_fanout.py [--subscribers 1,10,100,1000] [--events 40] [--json]
                                [--server sidecar|bare] [--loop asyncio|uvloop] [--gc-freeze]

The sidecar's real gRPC server (sidecar.api.grpc.GrpcApi) runs in this process on its own event
loop, fed by a Broadcaster as the elector feeds it; `--server bare` runs instead the least a
grpc.aio server can do (one handler per stream writing the same pre-serialised bytes on every
event), the floor to compare with, measured the same way. `--loop uvloop` runs either on
uvloop, `--gc-freeze` calls gc.freeze() once the server started. The subscribers run in a
separate process
(grpc.aio, up to 100 streams per connection), so their decoding does not count against the
server's CPU; the machine's cores are shared, as in a pod.

For every change it reports:
- delivered: publish -> the server finished writing to the last stream (Broadcaster.delivered());
- received: publish -> the last subscriber decoded it (wall clocks of one machine);
- loop lag: the worst delay of a 10 ms timer on the server loop while the change fans out,
  i.e. how late an elector renewal due at that moment would have started.
Plus the server's RSS before and after opening the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STREAMS_PER_CHANNEL = 100


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------ subscribers


def subscriber_main(address: str, count: int, pipe: Connection) -> None:
    asyncio.run(_subscribe(address, count, pipe))


async def _subscribe(address: str, count: int, pipe: Connection) -> None:
    import grpc

    from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb

    channels = [grpc.aio.insecure_channel(address) for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    seen: dict[int, list[float]] = {}
    first = asyncio.Event()
    connected = 0

    async def stream(channel: grpc.aio.Channel) -> None:
        nonlocal connected
        watch = channel.unary_stream(
            "/leadersidecar.v1.LeaderElection/Watch",
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.Leadership.FromString,
        )
        call = watch(pb.WatchRequest(), wait_for_ready=True)
        initial = True
        async for message in call:
            now = time.time()
            if initial:
                initial = False
                connected += 1
                if connected == count:
                    first.set()
                continue
            latency = now - message.observed_at.ToNanoseconds() / 1e9
            got = seen.setdefault(message.revision, [])
            got.append(latency)
            if len(got) == count:
                pipe.send((message.revision, max(got), statistics.median(got)))
                del seen[message.revision]

    tasks = [asyncio.create_task(stream(channels[i // STREAMS_PER_CHANNEL])) for i in range(count)]
    await first.wait()
    pipe.send("connected")
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # "stop"
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


# ---------------------------------------------------------------------------------- server


class _Control:
    def alive(self) -> bool:
        return True

    async def resign(self) -> Any:
        return None


async def _lag_probe(worst: list[float]) -> None:
    """A 10 ms timer; records how late it fires (what a renewal due then would suffer)."""
    while True:
        due = time.monotonic() + 0.01
        await asyncio.sleep(0.01)
        worst[0] = max(worst[0], time.monotonic() - due)


class _BareServer:
    """The floor: a bare grpc.aio Watch that writes the same bytes to every stream per event."""

    def __init__(self) -> None:
        self.streams = 0
        self._data = b""
        self._sequence = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._pending = 0
        self._done = asyncio.Event()
        self._server: Any = None

    async def start(self, address: str) -> str:
        import grpc

        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.unary_stream_rpc_method_handler(self._watch)
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "leadersidecar.v1.LeaderElection", {"Watch": handler}
                ),
            )
        )
        port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        return f"127.0.0.1:{port}"

    async def stop(self, grace: float = 0) -> None:
        await self._server.stop(grace)

    def publish(self, data: bytes) -> None:
        self._data = data
        self._sequence += 1
        self._pending = self.streams
        self._done.clear()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set_result(None)

    async def delivered(self, timeout: float) -> bool:
        async with asyncio.timeout(timeout):
            await self._done.wait()
        return True

    async def _watch(self, request: bytes, context: Any) -> None:
        loop = asyncio.get_running_loop()
        self.streams += 1
        seen = -1
        await context.write(self._data)
        seen = self._sequence
        while True:
            if seen == self._sequence:
                waiter = loop.create_future()
                self._waiters.append(waiter)
                await waiter
            seen = self._sequence
            await context.write(self._data)
            self._pending -= 1
            if self._pending == 0:
                self._done.set()


async def run_case(
    subscribers: int,
    events: int,
    server: str = "sidecar",
    gc_freeze: bool = False,
    grpc_thread: bool = False,
) -> dict[str, Any]:
    import gc

    from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb
    from sidecar.api.grpc import GrpcApi, to_message
    from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role

    initial = Leadership(
        identity="bench-a",
        role=Role.FOLLOWER,
        leader="bench-b",
        lease=LeaseInfo(name="bench", namespace="default", transitions=1),
        observed_at=datetime.now(UTC),
        fencing_token=1,
        ready=True,
    )
    broadcaster = Broadcaster(initial)
    bare = _BareServer() if server == "bare" else None
    api: Any = bare if bare is not None else GrpcApi(broadcaster, _Control())
    if bare is not None:
        bare.publish(to_message(initial).SerializeToString())
    if grpc_thread:
        # As the sidecar runs it: the gRPC server on a thread and event loop of its own, fed
        # from this loop (where the elector runs); delivered() covers the streams there too.
        from sidecar.api.grpc_thread import ThreadedGrpcApi
        from sidecar.api.guard import Guard, StreamSlots

        def crashed(what: str, exc: BaseException) -> None:
            raise SystemExit(f"{what} crashed: {exc!r}")

        api = ThreadedGrpcApi(broadcaster, _Control(), Guard(), StreamSlots(None), crashed)
    address = await api.start("127.0.0.1:0")
    if gc_freeze:
        gc.collect()
        gc.freeze()
    rss_before = rss_kib()

    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    worker = ctx.Process(target=subscriber_main, args=(address, subscribers, theirs))
    worker.start()
    loop = asyncio.get_running_loop()
    try:
        assert await loop.run_in_executor(None, ours.recv) == "connected"
        # Each stream registers before its first write, which the subscribers have all read.
        assert api.streams == subscribers, (api.streams, subscribers)
        rss_after = rss_kib()
        delivered: list[float] = []
        received: list[float] = []
        lags: list[float] = []
        for event in range(events):
            await asyncio.sleep(0.05)  # let the previous event's tail settle
            worst = [0.0]
            probe = asyncio.create_task(_lag_probe(worst))
            await asyncio.sleep(0.015)
            leader = f"bench-{'b' if event % 2 else 'c'}"
            started = time.perf_counter()
            change = replace(
                broadcaster.current,
                leader=leader,
                fencing_token=event + 2,
                observed_at=datetime.now(UTC),
            )
            if bare is not None:
                message: Any = to_message(change)
                message.revision = event + 2
                bare.publish(message.SerializeToString())
                ok = await bare.delivered(timeout=10)
            else:
                broadcaster.publish(change)
                ok = await broadcaster.delivered(timeout=10)
            delivered.append(time.perf_counter() - started)
            assert ok, "not delivered within 10 s"
            _revision, last, _median = await loop.run_in_executor(None, ours.recv)
            received.append(last)
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
            lags.append(worst[0])
        ours.send("stop")
    finally:
        await loop.run_in_executor(None, worker.join, 10)
        if worker.is_alive():
            worker.kill()
        await api.stop(grace=0)

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1000, 2)

    del pb
    return {
        "server": server,
        "gc_freeze": gc_freeze,
        "grpc_thread": grpc_thread,
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "subscribers": subscribers,
        "events": events,
        "delivered_p50_ms": ms(delivered, 50),
        "delivered_p99_ms": ms(delivered, 99),
        "received_p50_ms": ms(received, 50),
        "received_p99_ms": ms(received, 99),
        "loop_lag_max_ms": ms(lags, 100),
        "rss_added_mib": round((rss_after - rss_before) / 1024, 1),
        "rss_per_stream_kib": round((rss_after - rss_before) / subscribers, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", default="1,10,100,1000")
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--json", action="store_true", help="one JSON object per case")
    parser.add_argument("--server", choices=("sidecar", "bare"), default="sidecar")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument(
        "--grpc-thread", action="store_true", help="the gRPC server on its own thread and loop"
    )
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    rows = []
    for count in (int(n) for n in args.subscribers.split(",")):
        row = asyncio.run(
            run_case(count, args.events, args.server, args.gc_freeze, args.grpc_thread)
        )
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        header = (
            "subscribers  delivered p50/p99 ms  received p50/p99 ms  loop lag max ms  "
            "RSS added MiB (KiB/stream)"
        )
        print(header)
        for r in rows:
            print(
                f"{r['subscribers']:>11}  {r['delivered_p50_ms']:>8} / {r['delivered_p99_ms']:<8}"
                f"  {r['received_p50_ms']:>7} / {r['received_p99_ms']:<8}"
                f"  {r['loop_lag_max_ms']:>15}  {r['rss_added_mib']:>8} ({r['rss_per_stream_kib']})"
            )


if __name__ == "__main__":
    main()
