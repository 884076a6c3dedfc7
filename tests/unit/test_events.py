"""Kubernetes Events: what is sent, in order, rate-limited, and never in the elector's way.

The real API server is in tests/e2e/test_operations.py; here a fake client records calls.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import structlog

from sidecar.backends.kubeclient import ApiError, KubeApi
from sidecar.events import LeaderEvents, TokenBucket
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role
from sidecar.metrics import Metrics


class FakeApi:
    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []
        self.gets: list[str] = []
        self.status = 201
        self.gate: asyncio.Event | None = None  # when set, POSTs wait for it
        self.posted_one = asyncio.Event()
        self.closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float,
        query: dict[str, str] | None = None,
    ) -> Any:
        if method == "GET":
            self.gets.append(path)
            return {"metadata": {"uid": "uid-1234"}}
        assert (method, path) == ("POST", "/apis/events.k8s.io/v1/namespaces/pods-ns/events")
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), timeout)
        if self.status >= 400:
            raise ApiError(self.status, "Forbidden", "events.events.k8s.io is forbidden")
        self.posted.append(body)
        self.posted_one.set()
        return body

    async def close(self) -> None:
        self.closed = True


def make(api: FakeApi, **extra: Any) -> tuple[LeaderEvents, Metrics]:
    metrics = Metrics(
        Broadcaster(Leadership("pod-a", Role.UNKNOWN, "", LeaseInfo("l", "ns"), datetime.now(UTC))),
        process_metrics=False,
    )
    events = LeaderEvents(
        cast(KubeApi, api),
        pod="pod-a",
        pod_namespace="pods-ns",
        identity="pod-a",
        lease_name="leader-sidecar-0123456789abcdef",
        lease_namespace="lease-ns",
        metrics=metrics,
        **extra,
    )
    events.start()
    return events, metrics


def count(metrics: Metrics, result: str) -> float | None:
    return metrics.registry.get_sample_value(
        "leader_sidecar_kubernetes_events_total", {"result": result}
    )


async def test_became_leader_and_stopped_leading_are_sent_in_order() -> None:
    api = FakeApi()
    events, metrics = make(api)
    events.acquired(3)
    events.lost("shutdown")
    await events.close(timeout=5)
    assert api.closed
    assert [e["reason"] for e in api.posted] == ["BecameLeader", "StoppedLeading"]
    first, second = api.posted
    assert first["note"] == "pod-a became leader"
    assert second["note"] == "pod-a stopped leading: shutdown"
    assert first["apiVersion"] == "events.k8s.io/v1"
    assert first["reportingController"] == "leader-sidecar.io/leader-sidecar"
    assert first["reportingInstance"] == "pod-a"
    assert first["action"] == "LeaderElection"
    assert first["type"] == "Normal"
    assert first["metadata"]["namespace"] == "pods-ns"
    assert first["metadata"]["name"].startswith("pod-a.")
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["regarding"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": "pod-a",
        "namespace": "pods-ns",
        "uid": "uid-1234",  # read once from the Pod, for `kubectl describe pod`
    }
    assert first["related"]["kind"] == "Lease"
    assert first["related"]["namespace"] == "lease-ns"
    # MicroTime: six fractional digits and Z.
    assert len(first["eventTime"]) == len("2024-01-01T00:00:00.000000Z")
    assert first["eventTime"].endswith("Z")
    assert len(api.gets) == 1
    assert count(metrics, "sent") == 2


async def test_pod_uid_from_the_downward_api_spares_the_read() -> None:
    api = FakeApi()
    events, _ = make(api, pod_uid="from-env")
    events.acquired(0)
    await events.close(timeout=5)
    assert api.posted[0]["regarding"]["uid"] == "from-env"
    assert api.gets == []


async def test_the_elector_never_waits_for_the_api_server() -> None:
    api = FakeApi()
    api.gate = asyncio.Event()  # the API server does not answer
    events, metrics = make(api, queue_size=2, burst=100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(10):
        events.acquired(0)
        events.lost("resigned")
    assert loop.time() - started < 0.05
    # Two queued plus the one in flight at most; the rest dropped and counted.
    dropped = count(metrics, "dropped")
    assert dropped is not None and dropped >= 20 - 3
    api.gate.set()
    await events.close(timeout=5)
    assert len(api.posted) + (dropped or 0) == 20


async def test_a_flapping_election_is_rate_limited() -> None:
    api = FakeApi()
    events, metrics = make(api, burst=3, refill_seconds=3600)
    for _ in range(5):
        events.acquired(0)
    await events.close(timeout=5)
    assert len(api.posted) == 3
    assert count(metrics, "dropped") == 2


def test_the_token_bucket_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(2, 10.0, clock=lambda: now[0])
    assert bucket.take() and bucket.take()
    assert not bucket.take()
    now[0] = 9.0
    assert not bucket.take()
    now[0] = 10.5
    assert bucket.take()
    assert not bucket.take()


async def test_a_403_is_logged_once_naming_the_permission(
    capsys: pytest.CaptureFixture[str],
) -> None:
    structlog.reset_defaults()
    api = FakeApi()
    api.status = 403
    events, metrics = make(api)
    for _ in range(3):
        events.acquired(0)
    await events.close(timeout=5)
    out = capsys.readouterr().out
    assert out.count("RBAC denies 'create' on events.events.k8s.io") == 1
    assert "namespace 'pods-ns'" in out
    assert count(metrics, "failed") == 3
