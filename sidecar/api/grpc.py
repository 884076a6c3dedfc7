"""The gRPC face on loopback: GetLeader, Watch (a stream of changes), Resign; health; reflection.

Like the HTTP face it only reads snapshots from the Broadcaster and asks the elector to resign.
Each snapshot is serialised once, whatever the number of streams: handlers send pre-serialised
bytes (no response serializer), and take raw request bytes so that a malformed request gets
INVALID_ARGUMENT from us rather than a generic error from the framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator
from typing import Any, TypeVar

# gRPC's C core logs in its own format on stderr; its errors reach our log or the exit message
# anyway. GRPC_VERBOSITY=debug (or info, error) in the environment still turns them on.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # after the default above
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health_pb2_grpc import add_HealthServicer_to_server
from grpc_reflection.v1alpha import reflection

from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb
from sidecar.api.guard import Guard, StreamSlots
from sidecar.api.http import Control
from sidecar.api.shards_http import NOT_SHARDED, ShardControl
from sidecar.leadership import Broadcaster, Leadership, Role
from sidecar.shards.snapshot import ShardsBroadcaster, ShardsSnapshot

SERVICE = "leadersidecar.v1.LeaderElection"
SHARDS_SERVICE = "leadersidecar.v1.Shards"
# Health-only service name: SERVING on the leader alone, for probes and load balancers.
LEADER_SERVICE = "leadersidecar.v1.Leader"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

SERVER_OPTIONS: list[tuple[str, Any]] = [
    # gRPC sets SO_REUSEPORT by default: a second sidecar on the same port would silently share
    # it. Fail instead, as the HTTP listener does.
    ("grpc.so_reuseport", 0),
    # Calls that arrive faster than the server picks them up wait here; the defaults (1,000 soft,
    # 3,000 hard) cancel streams when a few thousand clients reconnect at once, e.g. after a
    # sidecar restart.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 40_000),
    # Ping idle connections so that a frozen client's streams are freed, not kept forever.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]

_STATE = {
    Role.LEADER: pb.Leadership.STATE_LEADER,
    Role.FOLLOWER: pb.Leadership.STATE_FOLLOWER,
    Role.UNKNOWN: pb.Leadership.STATE_UNKNOWN,
}

M = TypeVar("M", bound=Message)
Context = grpc.aio.ServicerContext[bytes, bytes]  # requests and responses travel as raw bytes
STOPPING = "leader-sidecar is stopping; reconnect"


class GrpcAddressError(Exception):
    """The gRPC address cannot be listened on."""


def to_message(
    snapshot: Leadership, monotonic_now: float | None = None, with_valid_for: bool = True
) -> pb.Leadership:
    """The protobuf form of a snapshot: the same facts as HTTP `/leader`."""
    lease = snapshot.lease
    state = _STATE[snapshot.role]
    if state == pb.Leadership.STATE_FOLLOWER and not snapshot.leader:
        state = pb.Leadership.STATE_NO_LEADER
    message = pb.Leadership(
        leader=snapshot.leader,
        identity=snapshot.identity,
        is_leader=snapshot.is_leader,
        state=state,
        error=snapshot.error or "",
        ready=snapshot.ready,
        app_health=snapshot.app_health or "",
        revision=snapshot.revision,
        lease=pb.Lease(name=lease.name, namespace=lease.namespace),
    )
    message.observed_at.FromDatetime(snapshot.observed_at)
    if snapshot.valid_until is not None:
        message.valid_until.FromDatetime(snapshot.valid_until)
    if snapshot.fencing_token is not None:
        message.fencing_token = snapshot.fencing_token
    if lease.transitions is not None:
        message.lease.transitions = lease.transitions
    if lease.acquire_time is not None:
        message.lease.acquire_time.FromDatetime(lease.acquire_time)
    if lease.renew_time is not None:
        message.lease.renew_time.FromDatetime(lease.renew_time)
    if lease.duration_seconds is not None:
        message.lease.duration_seconds = lease.duration_seconds
    if with_valid_for:
        now = time.monotonic() if monotonic_now is None else monotonic_now
        valid_for = snapshot.valid_for_ms(now)
        if valid_for is not None:
            message.valid_for_ms = valid_for
    return message


def shard_message(snapshot: ShardsSnapshot, monotonic_now: float | None = None) -> pb.ShardSet:
    """The protobuf form of a shard set: the same facts as HTTP `/shards`."""
    now = time.monotonic() if monotonic_now is None else monotonic_now
    view = snapshot.as_of(now)
    message = pb.ShardSet(
        shards=snapshot.shards,
        identity=snapshot.identity,
        members=list(snapshot.members),
        assignment={i: h for i, h in enumerate(snapshot.assignment) if h},
        desired={i: h for i, h in enumerate(snapshot.desired) if h},
        error=snapshot.error or "",
        ready=snapshot.ready,
        revision=snapshot.revision,
    )
    message.observed_at.FromDatetime(snapshot.observed_at)
    for owned in view.owned:
        entry = message.owned.add(
            shard=owned.shard,
            fencing_token=owned.fencing_token,
            valid_for_ms=max(0, int((owned.valid_until_monotonic - now) * 1000)),
        )
        entry.valid_until.FromDatetime(owned.valid_until)
    return message


_VALID_FOR_MS_TAG = b"\x68"  # field 13, varint


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Encoder:
    """Snapshot -> wire bytes, shared by every stream.

    Everything but `valid_for_ms` is serialised once per snapshot (snapshots are immutable and
    all woken streams send the same object, so remembering the last one, and its expired view,
    see `Leadership.as_of`, is enough). `valid_for_ms`, the remaining validity when the message
    is built, is appended per message as its own field: protobuf parses concatenated fields as
    one message.
    """

    def __init__(self) -> None:
        self._source: Leadership | None = None
        self._expired = False
        self._view: Leadership | None = None
        self._head = b""

    def encode(self, snapshot: Leadership, monotonic_now: float | None = None) -> bytes:
        if snapshot is self._source and snapshot.valid_until_monotonic is None:
            return self._head  # the fan-out's common case: a follower's snapshot, done before
        now = time.monotonic() if monotonic_now is None else monotonic_now
        view = snapshot.as_of(now)
        expired = view is not snapshot
        if snapshot is not self._source or expired != self._expired or self._view is None:
            message = to_message(view, with_valid_for=False)
            self._source, self._expired, self._view = snapshot, expired, view
            self._head = message.SerializeToString()
        valid_for = self._view.valid_for_ms(now)
        if valid_for is None:
            return self._head
        return self._head + _VALID_FOR_MS_TAG + _varint(valid_for)


class _Health(HealthServicer):
    """The stock servicer (Check, status keeping), with a Watch that never blocks `set()`.

    The stock Watch writes while holding the service's Condition, so one health watcher that
    stopped reading would block `set()` for everyone once its flow-control window is full. Here
    each watcher re-reads the status after a wake-up (latest value wins), holding nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self._statuses: dict[str, int] = {}
        self._closed = False
        self._pulse = asyncio.Event()

    def status(self, service: str) -> int:
        return self._statuses.get(service, SERVICE_UNKNOWN)

    async def update(self, statuses: dict[str, int]) -> None:
        if self._closed:
            return
        for service, status in statuses.items():
            self._statuses[service] = status
            await self.set(service, status)  # for the stock Check
        self._wake()

    async def shut_down(self) -> None:
        self._closed = True
        await self.enter_graceful_shutdown()
        self._statuses = dict.fromkeys(self._statuses, NOT_SERVING)
        self._wake()

    def _wake(self) -> None:
        # set() then clear(): every current waiter is woken, later ones wait for the next change.
        self._pulse.set()
        self._pulse.clear()

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ],
    ) -> None:
        last: int | None = None
        while True:
            status = self.status(request.service)
            if status == last:
                if self._closed:  # NOT_SERVING was sent: end the stream, do not hold up the stop
                    context.set_code(grpc.StatusCode.UNAVAILABLE)
                    context.set_details(STOPPING)
                    return
                await self._pulse.wait()
                continue
            await context.write(health_pb2.HealthCheckResponse(status=status))
            last = status


def _health_of(snapshot: Leadership, alive: bool) -> dict[str, int]:
    ready = alive and snapshot.ready
    return {
        # Like /readyz: an unreachable backend is reported, not "fixed" by a probe restarting us.
        "": SERVING if ready else NOT_SERVING,
        SERVICE: SERVING if ready and snapshot.error is None else NOT_SERVING,
        LEADER_SERVICE: SERVING if alive and snapshot.is_leader else NOT_SERVING,
    }


class GrpcApi:
    """The gRPC server. `start()` once the HTTP site listens; `stop()` after the elector's
    shutdown, so that open streams have been told "not leader" before they are closed."""

    def __init__(
        self,
        broadcaster: Broadcaster,
        control: Control,
        guard: Guard | None = None,
        slots: StreamSlots | None = None,
        shards: tuple[ShardsBroadcaster, ShardControl] | None = None,
    ) -> None:
        self._broadcaster = broadcaster
        self._control = control
        self._shards = shards
        self._guard = guard or Guard()
        self._slots = slots or StreamSlots(None)
        self._encoder = _Encoder()
        self._health = _Health()
        self._server: grpc.aio.Server | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._streams: set[asyncio.Task[Any]] = set()  # the tasks serving open Watch streams
        self._closing = False

    @property
    def streams(self) -> int:
        """Open Watch streams."""
        return len(self._streams)

    @property
    def health_task(self) -> asyncio.Task[None] | None:
        """The task keeping gRPC health in step with the election (for supervision)."""
        return self._health_task

    def snapshot(self) -> Leadership:
        return self._broadcaster.current.as_of(time.monotonic())

    async def start(self, address: str) -> str:
        """Listen on `host:port` or `unix:/path`; the address actually bound (port 0 resolved)."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            "GetLeader": grpc.unary_unary_rpc_method_handler(self._get_leader),
            "Watch": grpc.unary_stream_rpc_method_handler(self._watch),
            "Resign": grpc.unary_unary_rpc_method_handler(self._resign),
        }
        # Registered methods are looked up by the core, not by string matching in Python.
        server.add_registered_method_handlers(SERVICE, handlers)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        shard_handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            "GetShards": grpc.unary_unary_rpc_method_handler(self._get_shards),
            "Watch": grpc.unary_stream_rpc_method_handler(self._watch_shards),
            "Release": grpc.unary_unary_rpc_method_handler(self._release_shard),
        }
        server.add_registered_method_handlers(SHARDS_SERVICE, shard_handlers)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SHARDS_SERVICE, shard_handlers),)
        )
        add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE, SHARDS_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise GrpcAddressError(f"cannot listen on {address}: {exc}") from None
        await server.start()
        self._server = server
        await self._health.update(_health_of(self.snapshot(), self._control.alive()))
        self._health_task = asyncio.create_task(self._follow_health(), name="grpc-health")
        if address.startswith("unix:"):
            return address
        host = address.rpartition(":")[0]
        return f"{host}:{port}"

    async def stop(self, grace: float = 1.0) -> None:
        """Report NOT_SERVING and end every stream with UNAVAILABLE at once (clients reconnect);
        calls in flight get up to `grace` seconds."""
        if self._server is None:
            return
        self._closing = True
        await self._health.shut_down()
        if self._health_task is not None:
            self._health_task.cancel()
            # A crash of the follower was reported by the supervisor (sidecar/app.py) already.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._health_task
        # Watch streams never end by themselves: without this, stop() would always take `grace`.
        for task in self._streams:
            task.cancel(STOPPING)
        await self._server.stop(grace)
        self._server = None

    # ------------------------------------------------------------------ RPCs

    async def _authorise(self, context: Context, write: bool) -> None:
        if not write and not self._guard.token_required_for_reads:
            return
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode()
        problem = self._guard.token_problem(authorization, write=write)
        if problem is not None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    async def _get_leader(self, request: bytes, context: Context) -> bytes:
        await _parse(request, pb.GetLeaderRequest, context)
        await self._authorise(context, write=False)
        return self._encoder.encode(self._broadcaster.current)

    async def _watch(self, request: bytes, context: Context) -> None:
        await _parse(request, pb.WatchRequest, context)
        await self._authorise(context, write=False)
        task = asyncio.current_task()
        if self._closing or task is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
        if not self._slots.acquire():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._slots.refusal())
        self._streams.add(task)
        encode, write = self._encoder.encode, context.write
        try:
            with self._broadcaster.subscription() as updates:
                # Asking for the next snapshot only after the write completed is what tells
                # the Broadcaster that this client has heard the previous one (`delivered()`);
                # a client that stops reading only ever holds one pending write.
                while True:
                    await write(encode(await updates.next()))
        except asyncio.CancelledError:
            if not self._closing:
                raise  # the client went away
            task.uncancel()
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(STOPPING)
        finally:
            self._slots.release()
            self._streams.discard(task)

    async def _resign(self, request: bytes, context: Context) -> bytes:
        await _parse(request, pb.ResignRequest, context)
        await self._authorise(context, write=True)
        outcome = await self._control.resign()
        if not outcome.led:
            state = self.snapshot().role.value
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"this replica does not lead (it is {state})"
            )
        if not outcome.released:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"stepped down, but the Lease was not released: {outcome.error}",
            )
        return pb.ResignResponse(identity=self.snapshot().identity).SerializeToString()

    # ---------------------------------------------------------------- shards

    async def _shard_source(self, context: Context) -> tuple[ShardsBroadcaster, ShardControl]:
        if self._shards is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_SHARDED)
        assert self._shards is not None
        return self._shards

    async def _get_shards(self, request: bytes, context: Context) -> bytes:
        await _parse(request, pb.GetShardsRequest, context)
        await self._authorise(context, write=False)
        broadcaster, _ = await self._shard_source(context)
        return shard_message(broadcaster.current).SerializeToString()

    async def _watch_shards(self, request: bytes, context: Context) -> None:
        await _parse(request, pb.WatchShardsRequest, context)
        await self._authorise(context, write=False)
        broadcaster, _ = await self._shard_source(context)
        task = asyncio.current_task()
        if self._closing or task is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
        if not self._slots.acquire():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._slots.refusal())
        assert task is not None
        self._streams.add(task)
        updates = broadcaster.subscribe()
        try:
            async for snapshot in updates:
                await context.write(shard_message(snapshot).SerializeToString())
        except asyncio.CancelledError:
            if not self._closing:
                raise
            task.uncancel()
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(STOPPING)
        finally:
            await updates.aclose()
            self._slots.release()
            self._streams.discard(task)

    async def _release_shard(self, request: bytes, context: Context) -> bytes:
        message = await _parse(request, pb.ReleaseShardRequest, context)
        await self._authorise(context, write=True)
        _, control = await self._shard_source(context)
        shard = message.shard
        if shard >= control.shard_count:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no shard {shard}: shards are 0 to {control.shard_count - 1}",
            )
        outcome = await control.release(shard)
        if not outcome.led:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"this replica does not own shard {shard}"
            )
        if not outcome.released:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"stopped owning shard {shard}, but its Lease was not released: {outcome.error}",
            )
        return pb.ReleaseShardResponse(shard=shard).SerializeToString()

    # ---------------------------------------------------------------- health

    async def _follow_health(self) -> None:
        updates = self._broadcaster.subscribe()
        next_update = asyncio.ensure_future(anext(updates))
        try:
            await self._follow(updates, next_update)
        except Exception:
            # Never report a stale SERVING: the process ends (supervision in app.py) anyway.
            await self._health.update(dict.fromkeys((SERVICE, LEADER_SERVICE), NOT_SERVING))
            raise

    async def _follow(
        self,
        updates: AsyncGenerator[Leadership, None],
        next_update: asyncio.Future[Leadership],
    ) -> None:
        try:
            while True:
                snapshot = self.snapshot()
                await self._health.update(_health_of(snapshot, self._control.alive()))
                if next_update.done():
                    next_update = asyncio.ensure_future(anext(updates))
                # Wake at the leader's deadline too: never report the leader past it, even if
                # the elector is late to say so. (A renewal moves the deadline: we just wait again.)
                deadline = snapshot.valid_until_monotonic if snapshot.is_leader else None
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                await asyncio.wait({next_update}, timeout=timeout)
        finally:
            next_update.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await next_update
            await updates.aclose()


async def _parse(raw: bytes, kind: type[M], context: Context) -> M:
    """Decode a request; unknown fields are ignored (as protobuf does), garbage is refused."""
    try:
        return kind.FromString(raw)
    except DecodeError as exc:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"cannot decode {kind.DESCRIPTOR.full_name}: {exc}",
        )
