"""`--shards N` at the edges: the flag, `GET /shards` (JSON and SSE), `POST
/shards/{i}/release`, the 404 without sharding, and the snapshot never showing a shard owned
past its deadline."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.http import HttpApi
from sidecar.cli import build_parser, settings_from_args
from sidecar.config import ConfigError
from sidecar.election.elector import Resignation
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role
from sidecar.shards.snapshot import OwnedShard, ShardsBroadcaster, ShardsSnapshot
from tests.unit.test_http import FakeControl


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LEADER_SIDECAR_") or name in ("POD_NAME", "POD_NAMESPACE"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_the_shards_flag_and_its_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    parse = build_parser().parse_args
    assert settings_from_args(parse(["run"])).shards is None
    assert settings_from_args(parse(["run", "--shards", "8"])).shards == 8
    monkeypatch.setenv("LEADER_SIDECAR_SHARDS", "32")
    assert settings_from_args(parse(["run"])).shards == 32
    for bad in ("0", "-1", "x", "100000"):
        with pytest.raises(ConfigError, match="shards"):
            settings_from_args(parse(["run", "--shards", bad]))
    with pytest.raises(ConfigError, match="too long"):
        settings_from_args(parse(["run", "--shards", "4", "--lease-name", "a" * 240]))


def _leader() -> Leadership:
    return Leadership(
        identity="me",
        role=Role.FOLLOWER,
        leader="",
        lease=LeaseInfo("l-0", "ns"),
        observed_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


def _shards(owned: tuple[OwnedShard, ...] = ()) -> ShardsSnapshot:
    return ShardsSnapshot(
        identity="me",
        shards=4,
        owned=owned,
        members=("me", "other"),
        assignment=("me", "other", "", "other"),
        desired=("me", "other", "me", "other"),
        observed_at=datetime(2024, 1, 1, tzinfo=UTC),
        ready=True,
    )


class FakeShards:
    shard_count = 4

    def __init__(self) -> None:
        self.released: list[int] = []

    async def release(self, shard: int) -> Resignation:
        self.released.append(shard)
        return Resignation(led=shard == 0, released=shard == 0)


Api = tuple[TestClient[Any, Any], ShardsBroadcaster, FakeShards]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    shards = ShardsBroadcaster(_shards())
    control = FakeShards()
    http = HttpApi(Broadcaster(_leader()), FakeControl(), shards=(shards, control))
    client = TestClient(TestServer(http.app()))
    await client.start_server()
    yield client, shards, control
    http.close()
    await client.close()


async def test_get_shards_answers_the_owned_set_members_and_holders(api: Api) -> None:
    client, shards, _ = api
    deadline = time.monotonic() + 5
    owned = (OwnedShard(0, 7, datetime(2024, 1, 1, tzinfo=UTC), deadline),)
    shards.publish(_shards(owned))
    response = await client.get("/shards")
    assert response.status == 200
    body = await response.json()
    assert body["shards"] == 4
    assert [(o["shard"], o["fencing_token"]) for o in body["owned"]] == [(0, 7)]
    assert 0 < body["owned"][0]["valid_for_ms"] <= 5000
    assert body["owned"][0]["valid_until"] == "2024-01-01T00:00:00.000000Z"
    assert body["members"] == ["me", "other"]
    assert body["assignment"] == {"0": "me", "1": "other", "3": "other"}


async def test_a_shard_past_its_deadline_is_never_shown_as_owned(api: Api) -> None:
    client, shards, _ = api
    owned = (OwnedShard(0, 7, datetime(2024, 1, 1, tzinfo=UTC), time.monotonic() + 0.05),)
    shards.publish(_shards(owned))
    await asyncio.sleep(0.1)
    body = await (await client.get("/shards")).json()
    assert body["owned"] == []


async def test_the_shards_stream_sends_the_state_then_each_change(api: Api) -> None:
    client, shards, _ = api
    async with client.get("/shards?watch=true") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await response.content.readuntil(b"\n\n")
        assert b"event: shards" in first and b'"owned": []' in first
        owned = (OwnedShard(2, 1, datetime(2024, 1, 1, tzinfo=UTC), time.monotonic() + 5),)
        shards.publish(_shards(owned))
        second = await response.content.readuntil(b"\n\n")
        data = json.loads(second.split(b"data: ", 1)[1])
        assert [o["shard"] for o in data["owned"]] == [2]


async def test_release_answers_200_when_owned_409_when_not_404_for_no_such_shard(
    api: Api,
) -> None:
    client, _, control = api
    assert (await client.post("/shards/0/release")).status == 200
    assert (await client.post("/shards/1/release")).status == 409
    assert (await client.post("/shards/4/release")).status == 404
    assert (await client.post("/shards/x/release")).status == 404
    assert control.released == [0, 1]


async def test_without_shards_the_shard_paths_say_so_with_404() -> None:
    http = HttpApi(Broadcaster(_leader()), FakeControl())
    async with TestClient(TestServer(http.app())) as client:
        response = await client.get("/shards")
        assert response.status == 404
        assert "--shards" in (await response.json())["error"]
        assert (await client.post("/shards/0/release")).status == 404


# ---------------------------------------------------------------------------------- gRPC


async def test_grpc_shards_get_watch_and_release() -> None:
    import grpc

    from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb
    from sidecar.api._pb.leadersidecar.v1 import leader_pb2_grpc as pb_grpc
    from sidecar.api.grpc import GrpcApi

    shards = ShardsBroadcaster(_shards())
    control = FakeShards()
    api = GrpcApi(Broadcaster(_leader()), FakeControl(), shards=(shards, control))
    address = await api.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = pb_grpc.ShardsStub(channel)  # type: ignore[no-untyped-call]
            first = await stub.GetShards(pb.GetShardsRequest())
            assert first.shards == 4 and list(first.owned) == []
            assert dict(first.assignment) == {0: "me", 1: "other", 3: "other"}
            stream = stub.Watch(pb.WatchShardsRequest())
            assert list((await stream.read()).owned) == []
            deadline = time.monotonic() + 5
            owned = (OwnedShard(0, 7, datetime(2024, 1, 1, tzinfo=UTC), deadline),)
            shards.publish(_shards(owned))
            changed = await stream.read()
            assert [(o.shard, o.fencing_token) for o in changed.owned] == [(0, 7)]
            assert 0 < changed.owned[0].valid_for_ms <= 5000
            stream.cancel()
            assert (await stub.Release(pb.ReleaseShardRequest(shard=0))).shard == 0
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Release(pb.ReleaseShardRequest(shard=1))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.Release(pb.ReleaseShardRequest(shard=9))
            assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await api.stop(grace=0)


async def test_grpc_shards_without_shards_is_a_failed_precondition() -> None:
    import grpc

    from sidecar.api._pb.leadersidecar.v1 import leader_pb2 as pb
    from sidecar.api._pb.leadersidecar.v1 import leader_pb2_grpc as pb_grpc
    from sidecar.api.grpc import GrpcApi

    api = GrpcApi(Broadcaster(_leader()), FakeControl())
    address = await api.start("127.0.0.1:0")
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub: Any = pb_grpc.ShardsStub(channel)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetShards(pb.GetShardsRequest())
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--shards" in (refused.value.details() or "")
    finally:
        await api.stop(grace=0)
