"""Real sidecars behind a proxy that makes the real API server misbehave.

Each replica talks to kube-apiserver through its own HTTP proxy, which forwards faithfully until
told to answer otherwise: an HTML sign-in page, a JSON array, 429 with Retry-After, 503, 409 on
every write, garbage on the watch. Whatever it answers, the sidecars keep running, never write a
record naming another holder, stay within their request budget, keep what others put on the
Lease, and elect a leader again once the answers are sane.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.e2e.sidecars import RETRY, Sidecar, start_all, wait_one_leader
from tests.kube.cluster import Cluster

LEASE = "shop-lease"
# Requests a replica may send per retry period (the core's budget), plus one for the read that
# may follow a watch breaking.
BUDGET = 5 + 1


class FaultProxy:
    """Plain HTTP on loopback in front of the API server's TLS port, in a thread of its own."""

    def __init__(self, cluster: Cluster) -> None:
        self.mode = "pass"
        self.requests: list[tuple[float, str, str, Any]] = []  # (monotonic, method, path, body)
        self._cluster = cluster
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / f"kubeconfig-proxy-{self.port}"
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: p\n  cluster:\n    server: http://127.0.0.1:{self.port}\n"
            f"users:\n- name: admin\n  user:\n    token: {self._cluster.admin_token}\n"
            "contexts:\n- name: p\n  context:\n    cluster: p\n    user: admin\n"
            "current-context: p\n"
        )
        return path

    def calls(self, since: float) -> list[tuple[float, str, str, Any]]:
        """Reads and writes (not watches) since `since`."""
        return [r for r in list(self.requests) if r[0] >= since and "watch=true" not in r[2]]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        watching = request.query.get("watch") == "true"
        self.requests.append(
            (time.monotonic(), request.method, request.path_qs, json.loads(body) if body else None)
        )
        mode = self.mode
        if mode == "html" and not watching:
            return web.Response(text="<html><body>Sign in</body></html>", content_type="text/html")
        if mode == "array" and not watching:
            return web.json_response([{"kind": "Lease"}])
        if mode == "429":
            return _status(429, "TooManyRequests", {"Retry-After": "2"})
        if mode == "503":
            return _status(503, "ServiceUnavailable", {})
        if mode == "conflict" and request.method in ("PUT", "POST"):
            return _status(409, "Conflict", {})
        if mode == "garbage" and watching:
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            await response.prepare(request)
            await response.write(b"this is not json\n")
            return response
        return await self._forward(request, body, watching)

    async def _forward(
        self, request: web.Request, body: bytes, watching: bool
    ) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")
        }
        headers["Authorization"] = f"Bearer {self._cluster.admin_token}"
        upstream = await self._session.request(
            request.method,
            self._cluster.server + request.path_qs,
            data=body or None,
            headers=headers,
            ssl=self._cluster.ssl_context(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        async with upstream:
            if not watching:
                return web.Response(
                    status=upstream.status,
                    body=await upstream.read(),
                    content_type=upstream.content_type,
                )
            response = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": "application/json"}
            )
            await response.prepare(request)
            async for line in upstream.content:
                await response.write(line)
            return response


def _status(code: int, reason: str, headers: dict[str, str]) -> web.Response:
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": reason,
        "message": f"injected {code}",
        "code": code,
    }
    return web.json_response(status, status=code, headers=headers)


@pytest.fixture
def proxies(kube_cluster: Cluster) -> Iterator[Callable[[], FaultProxy]]:
    made: list[FaultProxy] = []

    def make() -> FaultProxy:
        proxy = FaultProxy(kube_cluster)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


def lease_path(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{LEASE}"


def test_sidecars_survive_a_misbehaving_api_server(
    kube_cluster: Cluster,
    namespace: str,
    sidecars: Callable[..., Sidecar],
    proxies: Callable[[], FaultProxy],
    tmp_path: Path,
) -> None:
    # A released Lease someone annotated: no creation wait, and the annotation must survive.
    status, answer = kube_cluster.api(
        "POST",
        f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases",
        {
            "metadata": {"name": LEASE, "annotations": {"example.com/owner": "team-a"}},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 3},
        },
    )
    assert status == 201, answer
    names = ["r0", "r1"]
    pair = [proxies() for _ in names]
    group = start_all(
        sidecars(
            name,
            [
                "--kubeconfig",
                str(proxy.kubeconfig(tmp_path)),
                "--namespace",
                namespace,
                "--election",
                "shop",
                "--lease-name",
                LEASE,
            ],
        )
        for name, proxy in zip(names, pair, strict=True)
    )
    wait_one_leader(group)
    for mode in ("html", "array", "429", "503", "conflict", "garbage", "html"):
        started = time.monotonic()
        for proxy in pair:
            proxy.mode = mode
        time.sleep(2.5)  # the fault lasts this long: longer than the renew deadline
        for proxy in pair:
            proxy.mode = "pass"
        window = time.monotonic() - started
        for sidecar, proxy in zip(group, pair, strict=True):
            assert sidecar.proc.poll() is None, f"{sidecar.name} exited under {mode}"
            calls = proxy.calls(started)
            allowed = BUDGET * (window / RETRY + 1)
            if mode == "429":
                allowed = 2 * (window / 2 + 1)  # Retry-After: 2 is honoured
            assert len(calls) <= allowed, f"{sidecar.name}: {len(calls)} requests under {mode}"
        wait_one_leader(group, timeout=15)

    for sidecar, proxy in zip(group, pair, strict=True):
        for _, method, _, body in proxy.requests:
            if method in ("PUT", "POST") and body:
                holder = body["spec"].get("holderIdentity", "")
                assert holder in ("", sidecar.name), f"{sidecar.name} wrote holder {holder!r}"
        assert "Traceback" not in sidecar.log_text(), sidecar.log_text()[-2000:]
    status, lease = kube_cluster.api("GET", lease_path(namespace))
    assert lease["metadata"]["annotations"]["example.com/owner"] == "team-a"
