"""The HTTP face on loopback: `/leader` (JSON or Server-Sent Events), probes, resign.

It only reads snapshots from the Broadcaster and asks the elector to resign; it knows nothing
about Leases or Kubernetes. Loopback is not a security boundary against browsers, so every
request passes `sidecar.api.guard` first (Host, Origin, optional bearer token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from sidecar.api.guard import Denied, Guard, StreamSlots
from sidecar.api.shards_http import ShardControl, ShardsHttp
from sidecar.leadership import Broadcaster, Leadership

if TYPE_CHECKING:
    from sidecar.election.elector import Resignation
    from sidecar.shards.snapshot import ShardsBroadcaster

NO_CACHE = {"Cache-Control": "no-cache"}
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
SSE_KEEPALIVE_SECONDS = 15.0
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class Control(Protocol):
    """What the APIs may ask of the running election."""

    def alive(self) -> bool: ...

    async def resign(self) -> Resignation: ...


class MetricsSource(Protocol):
    """Prometheus exposition (sidecar/metrics.py): the body and its content type."""

    def render(self, accept: str | None) -> tuple[bytes, str]: ...


def _json(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/json",
        headers={**NO_CACHE, **headers},
    )


class HttpApi:
    def __init__(
        self,
        broadcaster: Broadcaster,
        control: Control,
        metrics: MetricsSource | None = None,
        guard: Guard | None = None,
        slots: StreamSlots | None = None,
        shards: tuple[ShardsBroadcaster, ShardControl] | None = None,
    ) -> None:
        self._broadcaster = broadcaster
        self._control = control
        self._metrics = metrics
        self._guard = guard or Guard()
        self._slots = slots or StreamSlots(None)
        self._closing = asyncio.Event()
        self._streams = 0
        self._table: dict[str, dict[str, Handler]] | None = None
        self._sharded = shards is not None
        self._shards = ShardsHttp(
            shards[0] if shards else None,
            shards[1] if shards else None,
            self._slots,
            self._closing,
            _wants_stream,
        )

    @property
    def streams(self) -> int:
        """Open event streams (the leader_sidecar_subscribers{api="sse"} gauge)."""
        return self._streams + self._shards.streams

    @streams.setter
    def streams(self, value: int) -> None:
        self._streams = value

    def close(self) -> None:
        """End every event stream (at shutdown, after the last state was sent)."""
        self._closing.set()

    def snapshot(self) -> Leadership:
        return self._broadcaster.current.as_of(time.monotonic())

    def _routes(self) -> dict[str, dict[str, Handler]]:
        gets: dict[str, Handler] = {
            "/": self.root,
            "/leader": self.leader,
            "/leader/self": self.leader_self,
            "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        if self._metrics is not None:
            gets["/metrics"] = metrics_handler(self._metrics)
        gets["/shards"] = self._shards.shards
        routes = {path: {"GET": h, "HEAD": h} for path, h in gets.items()}
        routes["/leader/resign"] = {"POST": self.resign}
        return routes

    def server(self) -> web.Server:
        """The low-level aiohttp server: `handle` is the whole application (no router, no
        middleware chain), which is what lets `GET /leader` keep up with a bare aiohttp
        handler while doing more (see bench/api_speed.py)."""
        return web.Server(self.handle, access_log=None)

    def app(self) -> web.Application:
        """The same as an aiohttp Application (for aiohttp's test client)."""
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The guard, then the route; errors as JSON."""
        if self._table is None:
            self._table = self._routes()
        try:
            self._guard.check(request.headers, request.method, request.path)
            path = request.path
            methods = self._table.get(path)
            if methods is None:
                shard = _shard_release(path)
                if shard is None:
                    return _json({"error": f"no such path: {path}"}, status=404)
                methods = {"POST": lambda _: self._shards.release_shard(shard)}
            handler = methods.get(request.method)
            if handler is None:
                return _json(
                    {
                        "error": f"method {request.method} not allowed on {request.path}",
                        "allowed": sorted(methods),
                    },
                    status=405,
                    Allow=", ".join(sorted(methods)),
                )
            return await handler(request)
        except Denied as exc:
            extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
            return _json({"error": exc.reason}, status=exc.status, **extra)

    async def root(self, request: web.BaseRequest) -> web.StreamResponse:
        # Browsers get the status page. The old contrib leader-elector answered {"name": ...}
        # on every path; scripts that curl the root (Accept: */*) keep getting the JSON.
        if _wants_stream(request):
            return await self._stream(request)
        if _wants_html(request):
            from sidecar.api.status_page import page

            body, headers = page(shards=self._sharded)
            return web.Response(body=body, headers=headers)
        return web.Response(
            body=self._broadcaster.current.as_of(time.monotonic()).to_json(),
            content_type="application/json",
            headers={**NO_CACHE, "Vary": "Accept"},
        )

    async def leader(self, request: web.BaseRequest) -> web.StreamResponse:
        if _wants_stream(request):
            return await self._stream(request)
        now = time.monotonic()
        return web.Response(
            body=self._broadcaster.current.as_of(now).to_json(now),
            content_type="application/json",
            headers=NO_CACHE,
        )

    async def leader_self(self, request: web.BaseRequest) -> web.Response:
        snapshot = self.snapshot()
        status = 200 if snapshot.is_leader else 503
        return web.Response(
            body=snapshot.to_json(),
            status=status,
            content_type="application/json",
            headers=NO_CACHE,
        )

    async def resign(self, request: web.BaseRequest) -> web.Response:
        outcome = await self._control.resign()
        identity = self.snapshot().identity
        if not outcome.led:
            return _json(
                {
                    "resigned": False,
                    "error": "this replica does not lead",
                    "state": self.snapshot().role.value,
                },
                status=409,
            )
        if outcome.released:
            return _json({"resigned": True, "released": True, "identity": identity})
        # It stepped down all the same; others take over once the lease lapses.
        return _json(
            {"resigned": True, "released": False, "identity": identity, "error": outcome.error},
            status=503,
        )

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        snapshot = self.snapshot()
        alive = self._control.alive()
        body = {
            "status": "ok"
            if alive and snapshot.error is None
            else ("degraded" if alive else "dead"),
            "election_loop": "running" if alive else "stopped",
            "state": snapshot.role.value,
            "error": snapshot.error,
            "app_health": snapshot.app_health,
        }
        # Liveness means the loop runs: a lost API server is reported, not "fixed" by a restart.
        return _json(body, status=200 if alive else 503)

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        snapshot = self.snapshot()
        if snapshot.ready:
            return _json({"status": "ready", "state": snapshot.role.value})
        return _json(
            {"status": "not ready", "reason": snapshot.error or "no observation of the lease yet"},
            status=503,
        )

    async def _stream(self, request: web.BaseRequest) -> web.StreamResponse:
        if not self._slots.acquire():
            return _json(
                {"error": self._slots.refusal()},
                status=503,
                **{"Retry-After": "5"},
            )
        try:
            return await self._serve_stream(request)
        finally:
            self._slots.release()

    async def _serve_stream(self, request: web.BaseRequest) -> web.StreamResponse:
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
                snapshot = next_update.result().as_of(now)
                await response.write(
                    b"id: %d\nevent: leadership\ndata: %s\n\n"
                    % (snapshot.revision, snapshot.to_json(now))
                )
                next_update = asyncio.ensure_future(anext(updates))
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self.streams -= 1
            closing.cancel()
            next_update.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await next_update
            await updates.aclose()
        return response


def metrics_handler(
    metrics: MetricsSource,
) -> Handler:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body, content_type = metrics.render(request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type, **NO_CACHE})

    return handler


def metrics_app(metrics: MetricsSource) -> web.Application:
    """Only `GET /metrics`: for `--metrics-address`, which may face the pod network."""

    @web.middleware
    async def json_errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed:
            return _json({"error": f"method {request.method} not allowed"}, status=405)
        except web.HTTPNotFound:
            return _json({"error": f"no such path: {request.path}"}, status=404)

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/metrics", metrics_handler(metrics))
    return app


def _shard_release(path: str) -> str | None:
    """The `{shard}` of `/shards/{shard}/release`, else None."""
    if path.startswith("/shards/") and path.endswith("/release"):
        shard = path[len("/shards/") : -len("/release")]
        if shard and "/" not in shard:
            return shard
    return None


def _wants_html(request: web.BaseRequest) -> bool:
    """A browser's navigation asks for text/html; curl and HTTP libraries send */* or JSON."""
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (item.strip() for item in part.split(";"))
        if media.lower() in ("text/html", "application/xhtml+xml"):
            return not any(p.replace(" ", "") in ("q=0", "q=0.0", "q=0.00") for p in params)
    return False


def _wants_stream(request: web.BaseRequest) -> bool:
    """`?watch=true` (1/yes/on) or `Accept: text/event-stream`; a bad `watch` value is a 400."""
    values = request.query.getall("watch", []) if request.query_string else []
    for value in values:
        lowered = value.lower()
        if lowered not in _TRUE and lowered not in _FALSE:
            raise Denied(
                400, f"bad query value watch={value!r}: use true or false (1/0, yes/no, on/off)"
            )
    if values:
        return values[-1].lower() in _TRUE
    return "text/event-stream" in request.headers.get("Accept", "")
