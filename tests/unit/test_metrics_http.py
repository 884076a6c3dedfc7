"""`/metrics`, the SSE subscriber gauge and the status page at `GET /`, on a real aiohttp server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sidecar.api.http import HttpApi, metrics_app
from sidecar.api.status_page import page
from sidecar.election.elector import Resignation
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role
from sidecar.metrics import Metrics

CHROME_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)


class FakeControl:
    def alive(self) -> bool:
        return True

    async def resign(self) -> Resignation:
        return Resignation(led=False)


def snapshot(role: Role, leader: str, **extra: Any) -> Leadership:
    return Leadership(
        identity="me",
        role=role,
        leader=leader,
        lease=LeaseInfo("leader-sidecar-0123456789abcdef", "ns", 3, None, None, 15),
        observed_at=datetime(2024, 1, 1, tzinfo=UTC),
        ready=True,
        **extra,
    )


Api = tuple[TestClient[Any, Any], Broadcaster, Metrics, HttpApi]


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    broadcaster = Broadcaster(snapshot(Role.FOLLOWER, "other", fencing_token=3))
    metrics = Metrics(broadcaster, election="shop", backend="local", process_metrics=False)
    http = HttpApi(broadcaster, FakeControl(), metrics)
    metrics.count_subscribers("sse", lambda: http.streams)
    client = TestClient(TestServer(http.app()))
    await client.start_server()
    yield client, broadcaster, metrics, http
    http.close()
    await client.close()


async def scrape(client: TestClient[Any, Any]) -> str:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return await response.text()


def sample(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_metrics_are_served_and_follow_the_broadcaster(api: Api) -> None:
    client, broadcaster, _, _ = api
    text = await scrape(client)
    assert sample(text, "leader_sidecar_is_leader") == 0
    assert sample(text, "leader_sidecar_lease_transitions") == 3
    broadcaster.publish(
        snapshot(Role.LEADER, "me", fencing_token=4, valid_until_monotonic=time.monotonic() + 60)
    )
    assert sample(await scrape(client), "leader_sidecar_is_leader") == 1


async def test_open_event_streams_are_counted(api: Api) -> None:
    client, broadcaster, _, http = api
    assert sample(await scrape(client), 'leader_sidecar_subscribers{api="sse"}') == 0
    streams = [await client.get("/leader?watch=true") for _ in range(2)]
    for stream in streams:
        await stream.content.readline()  # the first event is on its way: the stream is open
    assert sample(await scrape(client), 'leader_sidecar_subscribers{api="sse"}') == 2
    for stream in streams:
        stream.close()
    # The server notices a gone client when it next writes to it: at the next changes.
    async with asyncio.timeout(5):
        while http.streams:
            broadcaster.publish(snapshot(Role.FOLLOWER, f"other-{time.monotonic()}"))
            await broadcaster.delivered(timeout=1)
    assert sample(await scrape(client), 'leader_sidecar_subscribers{api="sse"}') == 0


@pytest.mark.parametrize(
    "accept",
    [CHROME_ACCEPT, "text/html", "application/xhtml+xml,application/xml;q=0.9"],
)
async def test_browsers_get_the_status_page(api: Api, accept: str) -> None:
    client, _, _, _ = api
    response = await client.get("/", headers={"Accept": accept})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Vary"] == "Accept"
    assert "Content-Security-Policy" in response.headers
    assert "<title>leader-sidecar</title>" in await response.text()


@pytest.mark.parametrize(
    "accept",
    [None, "*/*", "application/json", "text/html;q=0, application/json", "text/plain"],
)
async def test_scripts_keep_getting_json_from_the_root(api: Api, accept: str | None) -> None:
    client, _, _, _ = api
    headers = {"Accept": accept} if accept is not None else {}
    response = await client.get("/", headers=headers, skip_auto_headers=["Accept"])
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Vary"] == "Accept"
    assert (await response.json())["name"] == "other"


async def test_the_root_still_streams_when_asked(api: Api) -> None:
    client, _, _, _ = api
    response = await client.get("/?watch=true", headers={"Accept": CHROME_ACCEPT})
    assert response.headers["Content-Type"] == "text/event-stream"
    response.close()


def test_the_page_is_self_contained_and_its_policy_allows_only_its_own_code() -> None:
    body, headers = page()
    html = body.decode()
    # Nothing from elsewhere: no URLs, no external scripts, styles, fonts or images.
    assert not re.search(r"https?://|//[a-z]", html, re.IGNORECASE)
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", html, re.IGNORECASE)
    assert "@import" not in html and "url(" not in html
    policy = dict(
        part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'"
    for tag in ("script", "style"):
        (content,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
        assert policy[f"{tag}-src"] == f"'sha256-{digest}'"
    # It follows the documented event stream.
    assert 'new EventSource("/leader?watch=true")' in html
    assert 'addEventListener("leadership"' in html
    assert "MAX_ENTRIES = 100" in html


async def test_the_metrics_only_server_serves_nothing_else(api: Api) -> None:
    _, _, metrics, _ = api
    async with TestClient(TestServer(metrics_app(metrics))) as client:
        response = await client.get("/metrics")
        assert response.status == 200
        assert "leader_sidecar_is_leader" in await response.text()
        for path in ("/leader", "/", "/leader/resign"):
            response = await client.get(path)
            assert response.status == 404
            assert "no such path" in json.loads(await response.text())["error"]
