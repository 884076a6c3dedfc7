"""`GET /shards` (JSON, or Server-Sent Events with `?watch=true`) and
`POST /shards/{i}/release`, for a sidecar started with `--shards N`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from sidecar.api.guard import StreamSlots

if TYPE_CHECKING:
    from sidecar.election.elector import Resignation
    from sidecar.shards.snapshot import ShardsBroadcaster

NO_CACHE = {"Cache-Control": "no-cache"}
SSE_KEEPALIVE_SECONDS = 15.0
NOT_SHARDED = (
    "sharding is off: this sidecar elects one leader (GET /leader); start it with --shards N "
    "(LEADER_SIDECAR_SHARDS) to own shards"
)


class ShardControl(Protocol):
    @property
    def shard_count(self) -> int: ...

    async def release(self, shard: int) -> Resignation: ...


def _json(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
        headers={**NO_CACHE, **headers},
    )


class ShardsHttp:
    def __init__(
        self,
        broadcaster: ShardsBroadcaster | None,
        control: ShardControl | None,
        slots: StreamSlots,
        closing: asyncio.Event,
        wants_stream: Any,
    ) -> None:
        self._broadcaster = broadcaster
        self._control = control
        self._slots = slots
        self._closing = closing
        self._wants_stream = wants_stream
        self.streams = 0

    async def shards(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._broadcaster is None:
            return _json({"error": NOT_SHARDED}, status=404)
        if self._wants_stream(request):
            return await self._stream(request)
        return web.Response(
            body=self._broadcaster.current.to_json(time.monotonic()),
            content_type="application/json",
            headers=NO_CACHE,
        )

    async def release_shard(self, text: str) -> web.Response:
        """POST /shards/{text}/release (routed by sidecar.api.http.HttpApi.handle)."""
        if self._control is None:
            return _json({"error": NOT_SHARDED}, status=404)
        count = self._control.shard_count
        if not text.isdigit() or int(text) >= count:
            return _json({"error": f"no shard {text!r}: shards are 0 to {count - 1}"}, status=404)
        shard = int(text)
        outcome = await self._control.release(shard)
        if not outcome.led:
            return _json(
                {"shard": shard, "released": False, "error": "this replica does not own it"},
                status=409,
            )
        if outcome.released:
            return _json({"shard": shard, "released": True})
        return _json({"shard": shard, "released": False, "error": outcome.error}, status=503)

    async def _stream(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._broadcaster is not None
        if not self._slots.acquire():
            return _json({"error": self._slots.refusal()}, status=503, **{"Retry-After": "5"})
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            updates = self._broadcaster.subscribe()
            self.streams += 1
            next_update = asyncio.ensure_future(anext(updates))
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                while True:
                    done, _ = await asyncio.wait(
                        {next_update, closing},
                        timeout=SSE_KEEPALIVE_SECONDS,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if closing in done:
                        break
                    if not done:
                        await response.write(b": keep-alive\n\n")
                        continue
                    now = time.monotonic()
                    snapshot = next_update.result()
                    await response.write(
                        b"id: %d\nevent: shards\ndata: %s\n\n"
                        % (snapshot.revision, snapshot.to_json(now))
                    )
                    next_update = asyncio.ensure_future(anext(updates))
            except ConnectionResetError:
                pass
            finally:
                self.streams -= 1
                closing.cancel()
                next_update.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await next_update
                await updates.aclose()
            return response
        finally:
            self._slots.release()
