"""The HTTP face over a real aiohttp server on loopback, fed by a Broadcaster."""

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
from sidecar.election.elector import Resignation
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role


class FakeControl:
    def __init__(self) -> None:
        self.leading = True
        self.running = True

    def alive(self) -> bool:
        return self.running

    async def resign(self) -> Resignation:
        was, self.leading = self.leading, False
        return Resignation(led=was, released=was)


def snapshot(role: Role, leader: str, **extra: object) -> Leadership:
    fields: dict[str, object] = {
        "identity": "me",
        "role": role,
        "leader": leader,
        "lease": LeaseInfo("leader-sidecar-0123456789abcdef", "ns", 3, None, None, 15),
        "observed_at": datetime(2024, 1, 1, tzinfo=UTC),
        "ready": True,
    }
    fields.update(extra)
    return Leadership(**fields)  # type: ignore[arg-type]


Api = tuple[TestClient[Any, Any], Broadcaster, "FakeControl"]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    broadcaster = Broadcaster(snapshot(Role.FOLLOWER, "other", fencing_token=3))
    control = FakeControl()
    http = HttpApi(broadcaster, control)
    client = TestClient(TestServer(http.app()))
    await client.start_server()
    yield client, broadcaster, control
    http.close()
    await client.close()


async def test_leader_json_has_the_contract_fields(api: Api) -> None:
    client, _, _ = api
    response = await client.get("/leader")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-cache"
    body = await response.json()
    assert set(body) >= {
        "name",
        "identity",
        "is_leader",
        "state",
        "valid_until",
        "fencing_token",
        "observed_at",
        "lease",
    }
    assert set(body["lease"]) == {
        "name",
        "namespace",
        "transitions",
        "acquire_time",
        "renew_time",
        "duration_seconds",
    }
    assert (body["name"], body["identity"], body["is_leader"], body["state"]) == (
        "other",
        "me",
        False,
        "follower",
    )
    assert body["observed_at"] == "2024-01-01T00:00:00.000000Z"
    root = await (await client.get("/")).json()
    assert root == body


async def test_self_probe_and_resign(api: Api) -> None:
    client, broadcaster, _ = api
    assert (await client.get("/leader/self")).status == 503
    broadcaster.publish(snapshot(Role.LEADER, "me", fencing_token=4))
    assert (await client.get("/leader/self")).status == 200
    response = await client.post("/leader/resign")
    assert response.status == 200
    assert (await response.json())["resigned"] is True
    response = await client.post("/leader/resign")
    assert response.status == 409
    assert "does not lead" in (await response.json())["error"]


async def test_leadership_is_never_shown_past_its_deadline(api: Api) -> None:
    client, broadcaster, _ = api
    broadcaster.publish(
        snapshot(Role.LEADER, "me", fencing_token=4, valid_until_monotonic=time.monotonic() - 1)
    )
    body = await (await client.get("/leader")).json()
    assert body["is_leader"] is False
    assert body["state"] == "unknown"
    assert (await client.get("/leader/self")).status == 503


async def test_unknown_paths_and_methods_answer_json(api: Api) -> None:
    client, _, _ = api
    response = await client.get("/nope")
    assert response.status == 404
    assert "no such path" in (await response.json())["error"]
    response = await client.delete("/leader")
    assert response.status == 405
    assert (await response.json())["allowed"]
    response = await client.get("/leader/resign")
    assert response.status == 405


async def test_probes(api: Api) -> None:
    client, broadcaster, control = api
    assert (await client.get("/readyz")).status == 200
    health = await (await client.get("/healthz")).json()
    assert health["status"] == "ok"
    broadcaster.publish(snapshot(Role.UNKNOWN, "", error="API server gone", ready=True))
    health = await (await client.get("/healthz")).json()
    assert (health["status"], health["error"]) == ("degraded", "API server gone")
    control.running = False
    assert (await client.get("/healthz")).status == 503
    broadcaster.publish(snapshot(Role.UNKNOWN, "", ready=False, error="RBAC denies 'get'"))
    response = await client.get("/readyz")
    assert response.status == 503
    assert "RBAC" in (await response.json())["reason"]


@pytest.mark.parametrize("how", ["accept", "query"])
async def test_event_stream_sends_the_state_then_each_change(api: Api, how: str) -> None:
    client, broadcaster, _ = api
    if how == "accept":
        response = await client.get("/leader", headers={"Accept": "text/event-stream"})
    else:
        response = await client.get("/leader?watch=true")
    assert response.headers["Content-Type"] == "text/event-stream"

    async def next_event() -> dict[str, object]:
        while True:
            line = (await asyncio.wait_for(response.content.readline(), 5)).decode()
            if line.startswith("data: "):
                return dict(json.loads(line[6:]))

    assert (await next_event())["name"] == "other"
    broadcaster.publish(snapshot(Role.LEADER, "me", fencing_token=4))
    event = await next_event()
    assert (event["is_leader"], event["fencing_token"]) == (True, 4)
    broadcaster.publish(snapshot(Role.FOLLOWER, "third"))
    assert (await next_event())["name"] == "third"
    response.close()


@pytest.mark.parametrize("value", ["maybe", "", "2", "tru"])
async def test_bad_watch_values_are_400(api: Api, value: str) -> None:
    client, _, _ = api
    response = await client.get(f"/leader?watch={value}")
    assert response.status == 400
    assert "watch" in (await response.json())["error"]


async def test_watch_false_answers_json(api: Api) -> None:
    client, _, _ = api
    response = await client.get("/leader?watch=false")
    assert response.status == 200 and (await response.json())["name"] == "other"


async def test_a_resign_that_could_not_release_is_503_with_the_reason(api: Api) -> None:
    client, broadcaster, control = api
    broadcaster.publish(snapshot(Role.LEADER, "me", fencing_token=4))

    async def failing() -> Resignation:
        return Resignation(led=True, released=False, error="release failed: timeout")

    control.resign = failing  # type: ignore[method-assign]
    response = await client.post("/leader/resign")
    assert response.status == 503
    body = await response.json()
    assert body == {
        "resigned": True,
        "released": False,
        "identity": "me",
        "error": "release failed: timeout",
    }


def test_the_status_page_follows_shards_only_when_the_sidecar_runs_them() -> None:
    from sidecar.api.status_page import page

    plain, plain_headers = page()
    sharded, sharded_headers = page(shards=True)
    assert b'<meta name="leader-sidecar-shards" content="off">' in plain
    assert b'<meta name="leader-sidecar-shards" content="on">' in sharded
    # The mark is outside the script: the same hashes allow the same script in both.
    assert plain_headers["Content-Security-Policy"] == sharded_headers["Content-Security-Policy"]
