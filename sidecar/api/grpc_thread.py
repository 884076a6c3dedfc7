"""The gRPC face (sidecar.api.grpc.GrpcApi) on a thread and event loop of its own.

grpc.aio pays about 50 µs per Watch stream per change; on the main loop, a change fanned out
to 1,000 streams delayed every other callback there (the elector's timers, the HTTP API) by
100-150 ms. Here the gRPC server runs on its own loop and the main loop only hands snapshots
over: measured with 1,000 streams, the main loop's worst lag fell to 40-60 ms (what is left is
the GIL), and the streams got the change no later (bench/grpc_fanout.py --grpc-thread).

The main loop forwards every snapshot its Broadcaster wakes subscribers for to a mirror
Broadcaster on the gRPC loop, and asks for the next one only once every gRPC stream wrote it:
so the main Broadcaster's `delivered()` ("the app heard it before the Lease is released")
still covers the gRPC streams. Resign calls are handed back to the main loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from sidecar.api.guard import Guard, StreamSlots
from sidecar.api.http import Control
from sidecar.leadership import Broadcaster

if TYPE_CHECKING:
    from sidecar.api.grpc import GrpcApi
    from sidecar.api.shards_http import ShardControl
    from sidecar.election.elector import Resignation
    from sidecar.shards.snapshot import ShardsBroadcaster

T = TypeVar("T")
RELAY_SECONDS = 1.0  # at most, per change, for every gRPC stream to have written it
OnCrash = Callable[[str, BaseException], None]


class _MainShards:
    """The shard control as seen from the gRPC loop: releases run on the main loop."""

    def __init__(self, control: ShardControl, main: asyncio.AbstractEventLoop) -> None:
        self._control = control
        self._main = main

    @property
    def shard_count(self) -> int:
        return self._control.shard_count

    async def release(self, shard: int) -> Resignation:
        future = asyncio.run_coroutine_threadsafe(self._control.release(shard), self._main)
        return await asyncio.wrap_future(future)


class _MainControl:
    """The Control as seen from the gRPC loop: resign runs on the main loop."""

    def __init__(self, control: Control, main: asyncio.AbstractEventLoop) -> None:
        self._control = control
        self._main = main

    def alive(self) -> bool:
        return self._control.alive()

    async def resign(self) -> Resignation:
        future = asyncio.run_coroutine_threadsafe(self._control.resign(), self._main)
        return await asyncio.wrap_future(future)


class ThreadedGrpcApi:
    def __init__(
        self,
        broadcaster: Broadcaster,
        control: Control,
        guard: Guard,
        slots: StreamSlots,
        on_crash: OnCrash,
        shards: tuple[ShardsBroadcaster, ShardControl] | None = None,
    ) -> None:
        self._shards = shards
        self._shard_mirror: ShardsBroadcaster | None = None
        self._broadcaster = broadcaster
        self._control = control
        self._guard = guard
        self._slots = slots
        self._on_crash = on_crash
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="grpc", daemon=True)
        self._mirror: Broadcaster | None = None
        self._api: GrpcApi | None = None
        self.forwarder: asyncio.Task[None] | None = None

    @property
    def streams(self) -> int:
        return self._api.streams if self._api is not None else 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _there(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def start(self, address: str) -> str:
        """Listen (GrpcAddressError if it cannot); then forward snapshots."""
        self._thread.start()
        main = asyncio.get_running_loop()
        try:
            listening = await self._there(self._start(address, main))
        except BaseException:
            await self._halt()
            raise
        self.forwarder = asyncio.create_task(self._forward(), name="grpc-forward")
        return listening

    async def _start(self, address: str, main: asyncio.AbstractEventLoop) -> str:
        from sidecar.api.grpc import GrpcApi

        self._mirror = Broadcaster(self._broadcaster.current)
        shards: tuple[ShardsBroadcaster, ShardControl] | None = None
        if self._shards is not None:
            from sidecar.shards.snapshot import ShardsBroadcaster

            self._shard_mirror = ShardsBroadcaster(self._shards[0].current)
            shards = (self._shard_mirror, _MainShards(self._shards[1], main))
        self._api = GrpcApi(
            self._mirror,
            _MainControl(self._control, main),
            self._guard,
            self._slots,
            shards=shards,
        )
        listening = await self._api.start(address)
        health = self._api.health_task
        assert health is not None

        def ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                main.call_soon_threadsafe(self._on_crash, "grpc-health", task.exception())  # type: ignore[arg-type]

        health.add_done_callback(ended)
        return listening

    async def _forward(self) -> None:
        if self._shards is not None:
            await asyncio.gather(self._forward_leadership(), self._forward_shards())
        else:
            await self._forward_leadership()

    async def _forward_leadership(self) -> None:
        """Hand each snapshot over; ask for the next one (which tells the main Broadcaster this
        one was delivered) once every gRPC stream wrote it, or as soon as a newer one exists:
        a gRPC client that stopped reading never holds up the others."""
        with self._broadcaster.subscription() as updates:
            while True:
                snapshot = await updates.next()
                relayed = asyncio.ensure_future(self._there(self._relay(snapshot)))
                newer = asyncio.ensure_future(updates.newer())
                await asyncio.wait({relayed, newer}, return_when=asyncio.FIRST_COMPLETED)
                newer.cancel()

    async def _forward_shards(self) -> None:
        """As for leadership: the next shard set only once every gRPC stream wrote this one."""
        assert self._shards is not None
        broadcaster = self._shards[0]
        updates = broadcaster.subscribe()
        try:
            async for snapshot in updates:
                # As for leadership: move on as soon as a newer shard set exists.
                sequence = broadcaster._sequence
                relayed = asyncio.ensure_future(self._there(self._relay_shards(snapshot)))
                newer = asyncio.ensure_future(_woken_after(broadcaster, sequence))
                await asyncio.wait({relayed, newer}, return_when=asyncio.FIRST_COMPLETED)
                newer.cancel()
        finally:
            await updates.aclose()

    async def _relay_shards(self, snapshot: Any) -> None:
        assert self._shard_mirror is not None
        self._shard_mirror.relay(snapshot)
        await self._shard_mirror.delivered(timeout=RELAY_SECONDS)

    async def _relay(self, snapshot: Any) -> None:
        assert self._mirror is not None
        self._mirror.relay(snapshot)
        await self._mirror.delivered(timeout=RELAY_SECONDS)

    async def stop(self, grace: float) -> None:
        if self.forwarder is not None:
            self.forwarder.cancel()
            await asyncio.gather(self.forwarder, return_exceptions=True)
        if self._api is not None:
            await self._there(self._api.stop(grace))
        await self._halt()

    async def _halt(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        if not self._thread.is_alive():
            self._loop.close()


async def _woken_after(broadcaster: Any, sequence: int) -> None:
    """Until `broadcaster` (a ShardsBroadcaster) woke its subscribers after `sequence`,
    without telling it anything was handled."""
    if broadcaster._sequence != sequence:
        return
    waiter = asyncio.get_running_loop().create_future()
    broadcaster._waiters.add(waiter)
    try:
        await waiter
    finally:
        broadcaster._waiters.discard(waiter)
