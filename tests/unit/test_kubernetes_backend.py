"""The Kubernetes backend against a fake HTTP peer on loopback: every answer that is not a
Lease becomes a typed LockError with a readable message, Retry-After is passed on, updates keep
what others own, watches end quietly or fail typed, and re-authentication cuts nothing off.

The peer is a tiny aiohttp server that answers whatever each test scripts (real API-server
behaviour is covered by tests/e2e/test_kubernetes.py).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.backends import kubernetes
from sidecar.backends.kubeclient import KubeApi, retry_after_seconds
from sidecar.backends.kubernetes import KubernetesLeaseLock
from sidecar.election.lock import (
    LockConflict,
    LockError,
    LockForbidden,
    LockNotFound,
    LockUnavailable,
)
from sidecar.election.record import LeaderRecord, VersionedRecord

NS, NAME = "shop-ns", "leader-sidecar-abc"
LEASE_PATH = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{NAME}"
OURS = {"app.kubernetes.io/managed-by": "leader-sidecar", "leader-sidecar.io/election": "shop"}
RECORD = LeaderRecord("me", 15, datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1, tzinfo=UTC))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Fake:
    """The scripted peer: `handler` answers every request; `seen` records them."""

    handler: Handler | None = None
    seen: list[tuple[str, str, str, Any]] = field(default_factory=list)  # method, path, auth, body

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.seen.append((request.method, request.path, request.headers["Authorization"], body))
        assert self.handler is not None
        return await self.handler(request)


def lease(version: str = "7", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": NAME, "namespace": NS, "resourceVersion": version},
        "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15, **spec},
    }


def status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "status": "Failure", "code": code, "reason": reason}
    return web.json_response({**body, "message": message}, status=code)


def answer(response: Callable[[], web.StreamResponse]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return response()

    return handler


def write_kubeconfig(path: Path, port: int, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": NS}}],
        "current-context": "x",
    }
    path.write_text(json.dumps(config))


@pytest.fixture
async def fake() -> AsyncIterator[tuple[Fake, int]]:
    peer = Fake()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", peer.dispatch)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield peer, port
    await runner.cleanup()


@pytest.fixture
async def lock(fake: tuple[Fake, int], tmp_path: Path) -> AsyncIterator[KubernetesLeaseLock]:
    _, port = fake
    write_kubeconfig(tmp_path / "kubeconfig", port, "old")
    api = KubeApi(str(tmp_path / "kubeconfig"))
    await api.connect()
    lease_lock = KubernetesLeaseLock(api, NS, NAME, OURS, request_timeout=2.0)
    yield lease_lock
    await lease_lock.close()


async def call(lock: KubernetesLeaseLock, verb: str) -> object:
    if verb == "get":
        return await lock.get()
    if verb == "create":
        return await lock.create(RECORD)
    if verb == "update":
        return await lock.update(RECORD, "7")
    return [event async for event in lock.watch()]


VERBS = ["get", "create", "update", "watch"]


# ------------------------------------------------------------------ malformed answers

MALFORMED: dict[str, tuple[Callable[[], web.StreamResponse], list[str]]] = {
    "an auth proxy's HTML page": (
        lambda: web.Response(text="<html><body>Sign in</body></html>", content_type="text/html"),
        ["text/html", "<html><body>Sign in"],
    ),
    "a JSON array": (lambda: web.json_response([1, 2]), ["not a Lease", "list"]),
    "an object without resourceVersion": (
        lambda: web.json_response({"metadata": {"name": NAME}, "spec": {}}),
        ["not a Lease", "resourceVersion"],
    ),
    "a spec that is not an object": (
        lambda: web.json_response({**lease(), "spec": ["holderIdentity"]}),
        ["not a Lease", "spec is a JSON list"],
    ),
    "a bad MicroTime": (
        lambda: web.json_response(lease(renewTime="yesterday")),
        ["not a Lease", "yesterday"],
    ),
    "a transition count that is not a number": (
        lambda: web.json_response(lease(leaseTransitions={"n": 1})),
        ["not a Lease"],
    ),
    "a duration of 1e999": (
        lambda: web.Response(
            body=b'{"metadata": {"resourceVersion": "1"}, "spec": {"leaseDurationSeconds": 1e999}}',
            content_type="application/json",
        ),
        ["not a Lease", "infinity"],
    ),
    "JSON nested too deeply": (
        lambda: web.Response(body=b"[" * 100_000, content_type="application/json"),
        ["does not parse"],
    ),
    "truncated JSON": (
        lambda: web.Response(body=b'{"metadata": {"resourceVers', content_type="application/json"),
        ["does not parse", "resourceVers"],
    ),
    "JSON labelled as plain text": (
        lambda: web.Response(text=json.dumps(lease()), content_type="text/plain"),
        ["text/plain", "instead of JSON"],
    ),
}


@pytest.mark.parametrize("verb", ["get", "create", "update"])
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_an_answer_that_is_not_a_lease_is_lock_unavailable_saying_what_came(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock, case: str, verb: str
) -> None:
    peer, _ = fake
    response, words = MALFORMED[case]
    peer.handler = answer(response)
    with pytest.raises(LockUnavailable) as caught:
        await call(lock, verb)
    for word in words:
        assert word in str(caught.value)


async def test_a_body_cut_off_by_the_peer_is_lock_unavailable(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake

    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"metadata": {')
        assert request.transport is not None
        request.transport.close()
        return response

    peer.handler = cut
    for verb in ("get", "update"):
        with pytest.raises(LockUnavailable):
            await call(lock, verb)


@pytest.mark.parametrize("verb", VERBS)
async def test_an_error_page_from_a_proxy_is_lock_unavailable_with_its_first_bytes(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock, verb: str
) -> None:
    peer, _ = fake
    peer.handler = answer(
        lambda: web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")
    )
    with pytest.raises(LockUnavailable) as caught:
        await call(lock, verb)
    assert "502" in str(caught.value) and "<html>Bad Gateway" in str(caught.value)


# ------------------------------------------------------------------ status codes


async def test_429_carries_retry_after_seconds(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake

    def too_many() -> web.Response:
        response = status(429, "TooManyRequests", "slow down")
        response.headers["Retry-After"] = "3"
        return response

    peer.handler = answer(too_many)
    for verb in VERBS:
        with pytest.raises(LockUnavailable) as caught:
            await call(lock, verb)
        assert caught.value.retry_after == 3.0, verb
        assert "429" in str(caught.value) and "slow down" in str(caught.value)


async def test_503_with_an_http_date_retry_after_carries_the_seconds_until_then(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    when = datetime.now(UTC) + timedelta(seconds=30)

    def unavailable() -> web.Response:
        response = web.Response(status=503, text="busy")
        response.headers["Retry-After"] = format_datetime(when, usegmt=True)
        return response

    peer.handler = answer(unavailable)
    with pytest.raises(LockUnavailable) as caught:
        await lock.update(RECORD, "7")
    assert caught.value.retry_after is not None
    assert 27 <= caught.value.retry_after <= 30


def test_retry_after_values() -> None:
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("") is None
    assert retry_after_seconds("2.5") == 2.5
    assert retry_after_seconds("-4") == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


async def test_a_500_without_retry_after_has_none(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: status(500, "InternalError", "etcd is sad"))
    with pytest.raises(LockUnavailable) as caught:
        await lock.get()
    assert caught.value.retry_after is None
    assert "etcd is sad" in str(caught.value)


async def test_update_of_a_deleted_lease_is_lock_not_found(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: status(404, "NotFound", f'leases "{NAME}" not found'))
    with pytest.raises(LockNotFound):
        await lock.update(RECORD, "7")
    assert await lock.get() is None


async def test_update_at_a_stale_version_is_lock_conflict(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: status(409, "Conflict", "the object has been modified"))
    with pytest.raises(LockConflict):
        await lock.update(RECORD, "7")


async def test_create_of_an_existing_lease_is_lock_conflict(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: status(409, "AlreadyExists", "already exists"))
    with pytest.raises(LockConflict):
        await lock.create(RECORD)


async def test_create_in_a_missing_namespace_is_lock_unavailable_naming_it(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: status(404, "NotFound", f'namespaces "{NS}" not found'))
    with pytest.raises(LockUnavailable) as caught:
        await lock.create(RECORD)
    assert not isinstance(caught.value, LockNotFound)
    assert f"namespace '{NS}' does not exist" in str(caught.value)


async def test_a_404_page_from_a_proxy_on_get_is_not_an_absent_lease(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: web.Response(status=404, text="no such route"))
    with pytest.raises(LockUnavailable):
        await lock.get()


@pytest.mark.parametrize(("code", "kind"), [(401, LockForbidden), (403, LockForbidden)])
async def test_refusals_are_lock_forbidden(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock, code: int, kind: type[LockError]
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: status(code, "Forbidden", "nope"))
    for verb in VERBS:
        with pytest.raises(kind):
            await call(lock, verb)


async def test_an_unreachable_api_server_is_lock_unavailable(tmp_path: Path) -> None:
    write_kubeconfig(tmp_path / "kubeconfig", 1, "t")  # nothing listens on port 1
    api = KubeApi(str(tmp_path / "kubeconfig"))
    await api.connect()
    lease_lock = KubernetesLeaseLock(api, NS, NAME, OURS, request_timeout=2.0)
    try:
        for verb in VERBS:
            with pytest.raises(LockUnavailable) as caught:
                await call(lease_lock, verb)
            assert "cannot reach the API server" in str(caught.value)
    finally:
        await lease_lock.close()


# ------------------------------------------------------------------ what updates keep


def foreign_lease(version: str) -> dict[str, Any]:
    obj = lease(version, strategy="OldestEmulationVersion", preferredHolder="web-2")
    obj["metadata"].update(
        uid="0b6c-uid",
        creationTimestamp="2024-01-01T00:00:00Z",
        annotations={"team": "payments"},
        labels={"cost-center": "42", "app.kubernetes.io/managed-by": "someone"},
        ownerReferences=[{"apiVersion": "v1", "kind": "ConfigMap", "name": "o", "uid": "u1"}],
        finalizers=["example.com/keep"],
        managedFields=[{"manager": "kubectl", "operation": "Update"}],
    )
    return obj


async def test_an_update_keeps_what_others_own_and_replaces_only_the_record(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    stored = foreign_lease("7")

    async def server(request: web.Request) -> web.StreamResponse:
        nonlocal stored
        if request.method == "PUT":
            stored = json.loads(await request.read())
            stored["metadata"]["resourceVersion"] = "8"
        return web.json_response(stored)

    peer.handler = server
    seen = await lock.get()
    assert seen is not None and seen.version == "7"
    renewed = await lock.update(RECORD, "7")
    assert renewed == VersionedRecord(RECORD, "8")
    method, path, _, body = peer.seen[-1]
    assert (method, path) == ("PUT", LEASE_PATH)
    metadata = body["metadata"]
    assert metadata["resourceVersion"] == "7"
    assert metadata["annotations"] == {"team": "payments"}
    assert metadata["labels"] == {"cost-center": "42", **OURS}
    assert metadata["ownerReferences"][0]["name"] == "o"
    assert metadata["finalizers"] == ["example.com/keep"]
    assert metadata["uid"] == "0b6c-uid"
    assert "managedFields" not in metadata
    assert body["spec"] == {
        "strategy": "OldestEmulationVersion",
        "preferredHolder": "web-2",
        **RECORD.to_spec(),
    }
    # The next renewal starts from what the update answered.
    await lock.update(RECORD, "8")
    assert peer.seen[-1][3]["metadata"]["annotations"] == {"team": "payments"}


async def test_an_update_drops_record_fields_the_new_record_leaves_out(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(
        lambda: web.json_response(lease("7", renewTime="2024-01-01T00:00:00.000000Z"))
    )
    await lock.get()
    await lock.update(LeaderRecord("me", 15), "7")
    assert "renewTime" not in peer.seen[-1][3]["spec"]


async def test_an_update_at_a_version_never_seen_sends_a_lease_of_our_own(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = answer(lambda: web.json_response(lease("99")))
    await lock.update(RECORD, "42")
    body = peer.seen[-1][3]
    assert body["metadata"] == {
        "name": NAME,
        "namespace": NS,
        "labels": OURS,
        "resourceVersion": "42",
    }
    assert body["spec"] == RECORD.to_spec()


async def test_the_lease_cache_stays_small(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    version = 0

    async def server(request: web.Request) -> web.StreamResponse:
        nonlocal version
        version += 1
        return web.json_response(foreign_lease(str(version)))

    peer.handler = server
    for _ in range(50):
        await lock.get()
    assert len(lock._seen) == kubernetes.REMEMBERED


# ------------------------------------------------------------------ watch


def watch_stream(*lines: bytes, hold: float = 0.0, gone: asyncio.Event | None = None) -> Handler:
    """GET answers the Lease; the watch answers `lines`, then stays open for `hold` seconds
    (writing nothing), and sets `gone` once a write finds the client gone."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            return web.json_response(lease("7"))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        if gone is not None:
            try:
                while True:
                    await asyncio.sleep(0.02)
                    await response.write(b"\n")
            except (ConnectionError, RuntimeError):
                gone.set()
                return response
        await asyncio.sleep(hold)
        return response

    return handler


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


async def collect(lock: KubernetesLeaseLock) -> list[VersionedRecord | None]:
    return [record async for record in lock.watch()]


async def test_a_watch_yields_changes_consumes_bookmarks_and_returns_when_the_server_ends_it(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    bookmark = {"kind": "Lease", "metadata": {"resourceVersion": "9"}}
    peer.handler = watch_stream(
        event("MODIFIED", lease("8", holderIdentity="b")),
        event("BOOKMARK", bookmark),
        event("DELETED", lease("10")),
    )
    got = await collect(lock)
    assert [None if r is None else (r.version, r.record.holder_identity) for r in got] == [
        ("7", "other"),
        ("8", "b"),
        None,
    ]
    query = [p for m, p, _, _ in peer.seen]
    assert query == [LEASE_PATH, LEASE_PATH.rsplit("/", 1)[0]]


async def test_410_gone_ends_a_watch_normally(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    peer.handler = watch_stream(event("ERROR", {"code": 410, "reason": "Expired"}))
    assert len(await collect(lock)) == 1


async def test_an_idle_watch_ends_normally(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer, _ = fake
    monkeypatch.setattr(kubernetes, "WATCH_IDLE_SECONDS", 0.3)
    peer.handler = watch_stream(hold=5)
    started = time.monotonic()
    assert len(await collect(lock)) == 1
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"<html>oops</html>\n", ["not JSON", "<html>oops"]),
        (b'{"type": "MODIFIED", "object": {"metad\n', ["not JSON"]),
        (b"[1, 2]\n", ["watch event we cannot read"]),
        (b'{"type": "MODIFIED", "object": [1]}\n', ["watch event we cannot read"]),
        (event("MODIFIED", {"metadata": {}}), ["not a Lease", "resourceVersion"]),
        (event("ERROR", {"code": 500, "message": "etcd gone"}), ["etcd gone"]),
    ],
)
async def test_a_garbage_watch_line_is_lock_unavailable_saying_what_came(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock, line: bytes, words: list[str]
) -> None:
    peer, _ = fake
    peer.handler = watch_stream(line)
    got: list[VersionedRecord | None] = []
    with pytest.raises(LockUnavailable) as caught:
        async for record in lock.watch():
            got.append(record)
    assert len(got) == 1  # the current record came first
    for word in words:
        assert word in str(caught.value)


async def test_a_watch_answered_with_html_fails_before_yielding(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") != "true":
            return web.json_response(lease("7"))
        return web.Response(text="<html>login</html>", content_type="text/html")

    peer.handler = handler
    with pytest.raises(LockUnavailable) as caught:
        await collect(lock)
    assert "text/html" in str(caught.value) and "<html>login" in str(caught.value)


async def test_leaving_a_watch_closes_its_http_response(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    gone = asyncio.Event()
    peer.handler = watch_stream(gone=gone)
    watch = lock.watch()
    assert await anext(watch) is not None
    await watch.aclose()
    await asyncio.wait_for(gone.wait(), 2)


# ------------------------------------------------------------------ re-authentication


async def test_reauthentication_does_not_cut_off_a_watch_in_flight(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock, tmp_path: Path
) -> None:
    """A 401 reloads the kubeconfig (a rotated token); the open watch keeps running on the
    old connection and is closed only when it ends."""
    peer, port = fake
    more = asyncio.Event()
    valid = "new"

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "true":
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await more.wait()
            await response.write(event("MODIFIED", lease("8", holderIdentity="b")))
            return response
        if request.headers["Authorization"] != f"Bearer {valid}":
            return status(401, "Unauthorized", "token expired")
        return web.json_response(lease("7"))

    peer.handler = handler
    write_kubeconfig(tmp_path / "kubeconfig", port, "new")  # rotated before the first read
    api = lock._api
    watch = lock.watch()
    assert await anext(watch) is not None  # its GET saw a 401, reloaded, read with "new"
    watching = api._transport
    valid = "newer"
    write_kubeconfig(tmp_path / "kubeconfig", port, "newer")
    assert await lock.get() is not None  # a 401, a reload, the retry with "newer"
    assert api._transport is not watching and watching in api._retired
    assert watching is not None and not watching.rest.pool_manager.closed
    more.set()
    changed = await anext(watch)
    assert changed is not None and changed.record.holder_identity == "b"
    with pytest.raises(StopAsyncIteration):
        await anext(watch)
    assert not api._retired
    assert watching.rest.pool_manager.closed
    assert [auth for _, _, auth, _ in peer.seen if auth != "Bearer old"][-1] == "Bearer newer"


# ------------------------------------------------------------------ anything at all


def random_body(rng: random.Random) -> bytes:
    values: list[Any] = [
        None,
        [],
        {},
        "x",
        17,
        1.5,
        True,
        lease(),
        {"metadata": {"resourceVersion": 5}},
        {"metadata": [], "spec": {}},
        {"metadata": {"resourceVersion": "1"}, "spec": {"renewTime": 3}},
        {"metadata": {"resourceVersion": "1"}, "spec": {"leaseTransitions": "many"}},
        {"type": "ADDED", "object": lease()},
        {"type": "ERROR", "object": {"code": "410"}},
        {"type": None, "object": None},
        {"kind": "Status", "code": 404, "reason": None, "message": ["x"]},
    ]
    encoded = json.dumps(rng.choice(values)).encode()
    match rng.randrange(4):
        case 0:
            return encoded
        case 1:
            return encoded[: rng.randrange(len(encoded) + 1)]
        case 2:
            return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        case _:
            return encoded + b"\n" + encoded[:-1] + b"\n"


async def test_whatever_the_peer_answers_a_call_ends_in_a_record_or_a_lock_error(
    fake: tuple[Fake, int], lock: KubernetesLeaseLock
) -> None:
    peer, _ = fake
    rng = random.Random(4040)

    async def anything(request: web.Request) -> web.StreamResponse:
        code = rng.choice([200, 200, 201, 401, 404, 409, 410, 429, 500, 503])
        headers = {"Retry-After": rng.choice(["1", "x", "-1", "Wed, 21 Oct 2015 07:28:00 GMT"])}
        content_type = rng.choice(["application/json", "text/html", "application/merge+json"])
        return web.Response(
            status=code, body=random_body(rng), content_type=content_type, headers=headers
        )

    peer.handler = anything
    outcomes: set[str] = set()
    for round in range(120):
        verb = VERBS[round % len(VERBS)]
        try:
            await call(lock, verb)
            outcomes.add("answer")
        except LockError as exc:  # anything else fails the test
            outcomes.add(type(exc).__name__)
    assert outcomes >= {"answer", "LockUnavailable", "LockConflict", "LockForbidden"}, outcomes
