"""The gRPC face in-process: messages, Watch fan-out, Resign, health, reflection, bad requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb
from sidecar.api._pb.leadersidecar.v1 import leader_pb2_grpc as pb_grpc
from sidecar.api.grpc import (
    LEADER_SERVICE,
    SERVICE,
    GrpcAddressError,
    GrpcApi,
    _Encoder,
    to_message,
)
from sidecar.election.elector import Resignation
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def follower(leader: str = "b", **changes: Any) -> Leadership:
    snapshot = Leadership(
        identity="a",
        role=Role.FOLLOWER,
        leader=leader,
        lease=LeaseInfo("lease", "ns", 3, T0, T0 + timedelta(seconds=4), 15),
        observed_at=T0 + timedelta(seconds=5),
        fencing_token=3 if leader else None,
        ready=True,
    )
    return replace(snapshot, **changes)


def leader(valid_for: float = 10.0, **changes: Any) -> Leadership:
    return follower(
        leader="a",
        role=Role.LEADER,
        fencing_token=4,
        valid_until=T0 + timedelta(seconds=15),
        valid_until_monotonic=time.monotonic() + valid_for,
        **changes,
    )


class FakeControl:
    def __init__(self) -> None:
        self.leading = False
        self.resigned = 0
        self.release_error: str | None = None

    def alive(self) -> bool:
        return True

    async def resign(self) -> Resignation:
        if not self.leading:
            return Resignation(led=False)
        self.resigned += 1
        if self.release_error is not None:
            return Resignation(led=True, released=False, error=self.release_error)
        return Resignation(led=True, released=True)


# The generated service stubs are untyped, and the typeshed ones are typed for sync channels.
def election_stub(channel: grpc.aio.Channel) -> Any:
    return pb_grpc.LeaderElectionStub(channel)  # type: ignore[no-untyped-call]


def health_stub(channel: grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel)


@dataclass
class Harness:
    api: GrpcApi
    broadcaster: Broadcaster
    control: FakeControl
    address: str
    channel: grpc.aio.Channel

    @property
    def stub(self) -> Any:
        return election_stub(self.channel)

    @property
    def health(self) -> Any:
        return health_stub(self.channel)

    def publish(self, snapshot: Leadership) -> Leadership:
        return self.broadcaster.publish(snapshot)

    async def check(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.health.Check(request)
        return int(response.status)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    broadcaster = Broadcaster(follower(leader="", role=Role.UNKNOWN, ready=False))
    control = FakeControl()
    api = GrpcApi(broadcaster, control)
    address = await api.start("127.0.0.1:0")
    channel = grpc.aio.insecure_channel(address)
    yield Harness(api, broadcaster, control, address, channel)
    await channel.close()
    await api.stop(grace=0)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition that has no event to wait on (task and stream counts)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# gRPC clients grow their receive window by bandwidth probing, so a client that stops reading
# buffers megabytes on its side before the server feels back-pressure. A small fixed window
# gets there after a few dozen messages, which keeps these tests fast.
STUCK_CLIENT = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


async def read(call: Any, timeout: float = 5.0) -> pb.Leadership:
    async with asyncio.timeout(timeout):
        message = await call.read()
    assert message is not grpc.aio.EOF
    assert isinstance(message, pb.Leadership)
    return message


# ---------------------------------------------------------------------------- messages


def test_message_carries_the_http_facts() -> None:
    snapshot = follower()
    message = to_message(replace(snapshot, revision=7))
    assert (message.leader, message.identity, message.is_leader) == ("b", "a", False)
    assert message.state == pb.Leadership.STATE_FOLLOWER
    assert message.fencing_token == 3 and message.HasField("fencing_token")
    assert not message.HasField("valid_until")
    assert message.observed_at.ToDatetime(tzinfo=UTC) == snapshot.observed_at
    assert (message.lease.name, message.lease.namespace) == ("lease", "ns")
    assert (message.lease.transitions, message.lease.duration_seconds) == (3, 15)
    assert message.lease.acquire_time.ToDatetime(tzinfo=UTC) == T0
    assert message.lease.renew_time.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=4)
    assert (message.ready, message.revision, message.error) == (True, 7, "")
    assert message.app_health == ""
    assert to_message(follower(app_health="unhealthy")).app_health == "unhealthy"


def test_states_and_unset_fields() -> None:
    lead = to_message(leader())
    assert lead.state == pb.Leadership.STATE_LEADER and lead.is_leader
    assert lead.valid_until.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=15)
    free = to_message(follower(leader=""))
    assert free.state == pb.Leadership.STATE_NO_LEADER
    assert not free.HasField("fencing_token")
    unknown = to_message(
        follower(leader="", role=Role.UNKNOWN, error="api down", lease=LeaseInfo("l", "ns"))
    )
    assert unknown.state == pb.Leadership.STATE_UNKNOWN and unknown.error == "api down"
    assert not unknown.lease.HasField("transitions")
    assert not unknown.lease.HasField("duration_seconds")
    assert not unknown.lease.HasField("acquire_time")


def test_encoder_serialises_each_snapshot_once_and_never_shows_an_expired_leader() -> None:
    encoder = _Encoder()
    snapshot = follower()
    first = encoder.encode(snapshot)
    assert encoder.encode(snapshot) is first  # shared by every stream, not re-serialised
    assert pb.Leadership.FromString(first).leader == "b"
    expired = leader(valid_for=-1.0)
    shown = pb.Leadership.FromString(encoder.encode(expired))
    assert shown.state == pb.Leadership.STATE_UNKNOWN and not shown.is_leader
    assert not shown.HasField("fencing_token")
    assert encoder.encode(expired) is encoder.encode(expired)


# --------------------------------------------------------------------------------- RPCs


async def test_get_leader(harness: Harness) -> None:
    harness.publish(follower())
    got = await harness.stub.GetLeader(pb.GetLeaderRequest())
    assert (got.state, got.leader, got.revision) == (pb.Leadership.STATE_FOLLOWER, "b", 1)
    harness.publish(leader(valid_for=-0.001))  # the elector is late to say it lost
    got = await harness.stub.GetLeader(pb.GetLeaderRequest())
    assert got.state == pb.Leadership.STATE_UNKNOWN and not got.is_leader


async def test_watch_sends_current_state_then_every_change_but_not_renewals(
    harness: Harness,
) -> None:
    harness.publish(follower())
    call = harness.stub.Watch(pb.WatchRequest())
    first = await read(call)
    assert (first.leader, first.revision) == ("b", 1)
    steps = [
        follower(leader=""),
        leader(),
        follower(leader="c"),
        follower(leader="", role=Role.UNKNOWN),
    ]
    for step in steps:
        # A renewal (only times move) wakes nobody ...
        harness.publish(replace(harness.broadcaster.current, observed_at=datetime.now(UTC)))
        # ... a change of facts reaches the stream at once.
        published = harness.publish(step)
        got = await read(call)
        assert got.revision == published.revision
        expected = to_message(published)
        assert got.HasField("valid_for_ms") == published.is_leader
        got.ClearField("valid_for_ms")
        expected.ClearField("valid_for_ms")
        assert got == expected
    call.cancel()


async def test_resign(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await harness.stub.Resign(pb.ResignRequest())
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not lead" in (failed.value.details() or "")
    harness.control.leading = True
    response = await harness.stub.Resign(pb.ResignRequest())
    assert response.identity == "a" and harness.control.resigned == 1


async def test_resign_that_could_not_release_is_unavailable_with_the_reason(
    harness: Harness,
) -> None:
    harness.control.leading = True
    harness.control.release_error = "release failed: the backend did not answer in time"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await harness.stub.Resign(pb.ResignRequest())
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "did not answer in time" in (failed.value.details() or "")


async def test_leader_health_is_not_serving_once_its_follower_task_died(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness.publish(leader())
    await eventually(lambda: harness.api._health.status(LEADER_SERVICE) == SERVING)
    task = harness.api.health_task
    assert task is not None
    # A bug in the follower: the next change makes it crash.
    monkeypatch.setattr(harness.api, "snapshot", lambda: 1 / 0)
    harness.publish(follower())
    await eventually(task.done)
    assert isinstance(task.exception(), ZeroDivisionError)
    assert await harness.check(LEADER_SERVICE) == NOT_SERVING
    assert await harness.check(SERVICE) == NOT_SERVING


@pytest.mark.parametrize("method", ["GetLeader", "Watch", "Resign"])
async def test_bad_requests_get_a_status(harness: Harness, method: str) -> None:
    path = f"/{SERVICE}/{method}"
    call: Any = (
        harness.channel.unary_stream(path)
        if method == "Watch"
        else harness.channel.unary_unary(path)
    )
    for garbage in (b"\xff\xff\xff", b"\x0f", b"\x0a\x05ab"):  # bad tag, bad wire type, short
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            result = call(garbage)
            if method == "Watch":
                await result.read()
            else:
                await result
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, garbage
    # Unknown fields (a newer client) are ignored, as protobuf does.
    if method == "GetLeader":
        assert pb.Leadership.FromString(await call(b"\x08\x96\x01\x12\x01x")).identity == "a"
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        nope: Any = harness.channel.unary_unary(f"/{SERVICE}/Nope")
        await nope(b"")
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (await harness.stub.GetLeader(pb.GetLeaderRequest())).identity == "a"  # still up


# ---------------------------------------------------------------------- fan-out, tasks


async def test_a_client_that_stops_reading_does_not_delay_others(harness: Harness) -> None:
    # Separate connections, as separate apps would have: HTTP/2 flow control is per connection.
    async with grpc.aio.insecure_channel(harness.address, options=STUCK_CLIENT) as stuck_channel:
        stuck = election_stub(stuck_channel).Watch(pb.WatchRequest())
        await read(stuck)  # then never again, until the end
        reader = harness.stub.Watch(pb.WatchRequest())
        await read(reader)
        started = time.monotonic()
        count = 1000  # about 80 KB: far more than the stuck stream's flow-control window
        worst = 0.0
        for i in range(count):
            published = harness.publish(follower(leader=f"replica-{i}"))
            sent = time.monotonic()
            got = await read(reader)
            worst = max(worst, time.monotonic() - sent)
            assert got.revision == published.revision
        final = harness.broadcaster.current.revision
        assert worst < 0.5, f"a change took {worst:.3f}s to reach the reading client"
        assert time.monotonic() - started < 30
        # The stuck stream holds at most one write in flight, so it has not seen the newest...
        assert not await harness.broadcaster.delivered(timeout=0.05)
        # ... and when it reads again it catches up by skipping to the newest state.
        received = 0
        while True:
            message = await read(stuck)
            received += 1
            if message.revision == final:
                break
        assert received < count, "every intermediate state was buffered for a stuck client"
        assert await harness.broadcaster.delivered(timeout=5)
        stuck.cancel()
        reader.cancel()


async def test_cancelled_streams_leave_no_tasks_behind(harness: Harness) -> None:
    harness.publish(follower())
    baseline_tasks = len(asyncio.all_tasks())
    baseline_subscribers = harness.broadcaster.subscribers  # the health follower
    calls = [harness.stub.Watch(pb.WatchRequest()) for _ in range(200)]
    await asyncio.gather(*(read(call) for call in calls))
    assert harness.api.streams == 200
    assert harness.broadcaster.subscribers == baseline_subscribers + 200
    for call in calls:
        call.cancel()
    await eventually(lambda: harness.api.streams == 0)
    await eventually(lambda: harness.broadcaster.subscribers == baseline_subscribers)
    # grpc.aio keeps a task or two of its own for the calls it expects next; a leak would be
    # one per stream.
    await eventually(lambda: len(asyncio.all_tasks()) <= baseline_tasks + 2)
    # A change after that is fanned out to nobody and leaves nothing pending.
    harness.publish(follower(leader="c"))
    assert await harness.broadcaster.delivered(timeout=1)


async def test_stop_ends_streams_at_once_and_leaves_no_tasks(harness: Harness) -> None:
    harness.publish(follower())
    before = asyncio.all_tasks()
    calls = [harness.stub.Watch(pb.WatchRequest()) for _ in range(20)]
    await asyncio.gather(*(read(call) for call in calls))
    health = harness.health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await health.read()).status == SERVING
    started = time.monotonic()
    await harness.api.stop(grace=5)
    assert time.monotonic() - started < 2, "stop() waited for streams that never end"
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await health.read()).status == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError):
        await health.read()
    assert harness.api.streams == 0
    await eventually(lambda: asyncio.all_tasks() <= before)
    assert not {t.get_name() for t in asyncio.all_tasks()} & {"grpc-health"}


# ------------------------------------------------------------------------------ health


async def test_health_follows_readiness_backend_errors_and_leadership(harness: Harness) -> None:
    async def statuses() -> tuple[int, int, int]:
        return (
            await harness.check(""),
            await harness.check(SERVICE),
            await harness.check(LEADER_SERVICE),
        )

    assert await statuses() == (NOT_SERVING, NOT_SERVING, NOT_SERVING)  # no observation yet
    watch = harness.health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    assert (await watch.read()).status == NOT_SERVING
    harness.publish(follower())
    assert (await watch.read()).status == SERVING
    assert await statuses() == (SERVING, SERVING, NOT_SERVING)
    harness.publish(follower(leader="", role=Role.UNKNOWN, error="connection refused"))
    assert (await watch.read()).status == NOT_SERVING
    # Readiness stays: a lost API server is reported, not "fixed" by a restart.
    assert await statuses() == (SERVING, NOT_SERVING, NOT_SERVING)
    harness.publish(leader())
    assert (await watch.read()).status == SERVING
    assert await statuses() == (SERVING, SERVING, SERVING)
    watch.cancel()


async def test_leader_health_flips_at_the_deadline_even_if_the_elector_is_late(
    harness: Harness,
) -> None:
    watch = harness.health.Watch(health_pb2.HealthCheckRequest(service=LEADER_SERVICE))
    assert (await watch.read()).status == NOT_SERVING
    harness.publish(leader(valid_for=0.3))
    assert (await watch.read()).status == SERVING
    started = time.monotonic()
    async with asyncio.timeout(3):
        assert (await watch.read()).status == NOT_SERVING  # no new snapshot was published
    assert time.monotonic() - started < 1.0
    watch.cancel()


async def test_health_watcher_that_stops_reading_blocks_no_update(harness: Harness) -> None:
    async with grpc.aio.insecure_channel(harness.address, options=STUCK_CLIENT) as stuck_channel:
        request = health_pb2.HealthCheckRequest(service=SERVICE)
        stuck = health_stub(stuck_channel).Watch(request)
        reader = harness.health.Watch(request)
        assert (await stuck.read()).status == (await reader.read()).status == NOT_SERVING
        for i in range(1000):  # ~16 KB of flips: more than the stuck stream's window
            harness.publish(follower(error="down" if i % 2 else None))
            expected = NOT_SERVING if i % 2 else SERVING
            async with asyncio.timeout(5):
                while (await reader.read()).status != expected:
                    pass
        assert await harness.check(SERVICE) == expected
        stuck.cancel()
        reader.cancel()


# ------------------------------------------------------------------ reflection, binding


async def test_reflection_lists_and_describes_the_services(harness: Harness) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(harness.channel)  # type: ignore[arg-type]

    async def ask(**request: Any) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]))
        async for response in call:
            return response  # type: ignore[no-any-return]
        raise AssertionError("no answer")

    listed = await ask(list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    described = await ask(file_containing_symbol=SERVICE)
    files = described.file_descriptor_response.file_descriptor_proto
    assert any(b"leadersidecar/v1/leader.proto" in raw for raw in files)


async def test_address_in_use_fails_instead_of_sharing_the_port(harness: Harness) -> None:
    other = GrpcApi(harness.broadcaster, harness.control)
    with pytest.raises(GrpcAddressError, match="cannot listen"):
        await other.start(harness.address)


async def test_unix_socket(tmp_path: Path) -> None:
    broadcaster = Broadcaster(follower())
    api = GrpcApi(broadcaster, FakeControl())
    address = f"unix:{tmp_path}/grpc.sock"
    assert await api.start(address) == address
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            got = await election_stub(channel).GetLeader(pb.GetLeaderRequest())
            assert got.leader == "b"
    finally:
        await api.stop(grace=0)


async def test_on_its_own_thread_a_client_that_stops_reading_does_not_delay_others() -> None:
    from sidecar.api.grpc_thread import ThreadedGrpcApi
    from sidecar.api.guard import Guard, StreamSlots

    crashes: list[BaseException] = []
    broadcaster = Broadcaster(follower())
    api = ThreadedGrpcApi(
        broadcaster, FakeControl(), Guard(), StreamSlots(None), lambda _, e: crashes.append(e)
    )
    address = await api.start("127.0.0.1:0")
    try:
        async with (
            grpc.aio.insecure_channel(address, options=STUCK_CLIENT) as stuck_channel,
            grpc.aio.insecure_channel(address) as channel,
        ):
            stuck = election_stub(stuck_channel).Watch(pb.WatchRequest())
            await read(stuck)  # then never again
            reader = election_stub(channel).Watch(pb.WatchRequest())
            await read(reader)
            worst = 0.0
            for i in range(300):
                published = broadcaster.publish(follower(leader=f"replica-{i}"))
                sent = time.monotonic()
                while (await read(reader)).revision != published.revision:
                    pass
                worst = max(worst, time.monotonic() - sent)
            assert worst < 0.5, f"a change took {worst:.3f}s to reach the reading client"
            stuck.cancel()
            reader.cancel()
    finally:
        await api.stop(grace=0)
    assert not crashes
