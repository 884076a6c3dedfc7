"""Metrics: fed by the elector's observer hooks and the Kubernetes client, read at scrape time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.election.elector import Elector, Timings
from sidecar.election.lock import LockConflict, LockForbidden, LockUnavailable
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role
from sidecar.metrics import Metrics, renew_failure_reason
from tests.unit.memory_lock import MemoryLock, Store

FAST = Timings(lease_duration=1.0, renew_deadline=0.6, retry_period=0.1)

# The documented list (README): name -> type. Scrape-time gauges that only appear once they
# have a value are marked optional below.
DOCUMENTED = {
    "leader_sidecar_is_leader": "gauge",
    "leader_sidecar_leader_known": "gauge",
    "leader_sidecar_leader_transitions": "counter",
    "leader_sidecar_renew_attempts": "counter",
    "leader_sidecar_renew_failures": "counter",
    "leader_sidecar_renew_duration_seconds": "histogram",
    "leader_sidecar_api_request_duration_seconds": "histogram",
    "leader_sidecar_api_request_errors": "counter",
    "leader_sidecar_seconds_since_last_renew": "gauge",
    "leader_sidecar_lease_transitions": "gauge",
    "leader_sidecar_subscribers": "gauge",
    "leader_sidecar_kubernetes_events": "counter",
    "leader_sidecar_build_info": "gauge",
    "leader_sidecar_election_info": "gauge",
}


def initial() -> Leadership:
    return Leadership("a", Role.UNKNOWN, "", LeaseInfo("l", "ns"), datetime.now(UTC))


class Replica:
    def __init__(self, store: Store, name: str) -> None:
        self.broadcaster = Broadcaster(
            Leadership(name, Role.UNKNOWN, "", LeaseInfo("l", "ns"), datetime.now(UTC))
        )
        self.metrics = Metrics(self.broadcaster, election="shop", backend="memory")
        self.elector = Elector(
            MemoryLock(store), name, FAST, self.broadcaster, "l", "ns", observer=self.metrics
        )
        self.task = asyncio.create_task(self.elector.run())

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    async def until(self, predicate: Callable[[Leadership], bool], timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            async for snapshot in self.broadcaster.subscribe():
                if predicate(snapshot):
                    return

    async def stop(self) -> None:
        # On Python 3.11 `asyncio.wait_for` loses a cancellation that arrives as its inner call
        # completes (the elector wraps every lock call in it), so cancel until it ends.
        while not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=0.5)
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.elector.shutdown(timeout=1)


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    yield Store()


async def writes(store: Store, count: int, timeout: float = 5) -> None:
    """Wait until the store saw `count` more writes (renewals) than now."""
    target = len(store.writes) + count
    async with asyncio.timeout(timeout), store.changed:
        await store.changed.wait_for(lambda: len(store.writes) >= target)


async def test_a_handover_moves_the_metrics_of_both_replicas(store: Store) -> None:
    a = Replica(store, "a")
    await a.until(lambda s: s.is_leader)
    b = Replica(store, "b")
    await b.until(lambda s: s.leader == "a")
    await writes(store, 3)  # the hooks of the first two renewals ran before the third
    assert a.value("leader_sidecar_is_leader") == 1
    assert b.value("leader_sidecar_is_leader") == 0
    assert a.value("leader_sidecar_leader_transitions_total", direction="acquired") == 1
    attempts = a.value("leader_sidecar_renew_attempts_total")
    assert attempts is not None and attempts >= 2
    assert a.value("leader_sidecar_renew_duration_seconds_count") == attempts
    assert b.value("leader_sidecar_renew_attempts_total") == 0
    since = a.value("leader_sidecar_seconds_since_last_renew")
    assert since is not None and 0 <= since < FAST.renew_deadline
    assert b.value("leader_sidecar_seconds_since_last_renew") is None  # never wrote
    assert a.value("leader_sidecar_lease_transitions") == 0

    assert (await a.elector.resign()).released
    await b.until(lambda s: s.is_leader)
    assert a.value("leader_sidecar_is_leader") == 0
    assert a.value("leader_sidecar_leader_transitions_total", direction="lost") == 1
    assert b.value("leader_sidecar_is_leader") == 1
    assert b.value("leader_sidecar_leader_transitions_total", direction="acquired") == 1
    assert b.value("leader_sidecar_lease_transitions") == 1
    await b.stop()
    assert b.value("leader_sidecar_leader_transitions_total", direction="lost") == 1
    await a.stop()


async def test_failed_renewals_are_counted_by_reason(store: Store) -> None:
    a = Replica(store, "a")
    await a.until(lambda s: s.is_leader)
    store.down = True
    await a.until(lambda s: not s.is_leader, timeout=FAST.renew_deadline + 2)
    failures = a.value("leader_sidecar_renew_failures_total", reason="unavailable")
    assert failures is not None and failures >= 1
    assert a.value("leader_sidecar_renew_failures_total", reason="conflict") == 0
    # The fan-out's timer says "not leader" at the deadline; the elector counts its loss then.
    async with asyncio.timeout(2):
        while a.value("leader_sidecar_leader_transitions_total", direction="lost") != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert a.value("leader_sidecar_leader_known") == 0
    await a.stop()


def test_renew_failure_reasons_are_a_small_fixed_set() -> None:
    assert renew_failure_reason(LockConflict("x")) == "conflict"
    assert renew_failure_reason(TimeoutError()) == "timeout"
    assert renew_failure_reason(LockForbidden("RBAC denies ...")) == "forbidden"
    assert renew_failure_reason(LockUnavailable("connection refused")) == "unavailable"


def test_is_leader_is_judged_at_scrape_time_against_the_deadline() -> None:
    now = time.monotonic()
    broadcaster = Broadcaster(initial())
    broadcaster.publish(
        Leadership(
            "a",
            Role.LEADER,
            "a",
            LeaseInfo("l", "ns", transitions=4),
            datetime.now(UTC),
            fencing_token=4,
            valid_until_monotonic=now + 5,
            ready=True,
        )
    )
    clock = [now]
    metrics = Metrics(broadcaster, clock=lambda: clock[0], process_metrics=False)
    registry = metrics.registry
    assert registry.get_sample_value("leader_sidecar_is_leader") == 1
    clock[0] = now + 5  # the elector is late: the deadline passed without a new snapshot
    assert registry.get_sample_value("leader_sidecar_is_leader") == 0
    assert registry.get_sample_value("leader_sidecar_leader_known") == 0


def test_seconds_since_last_renew_is_computed_when_scraped() -> None:
    clock = [100.0]
    metrics = Metrics(Broadcaster(initial()), clock=lambda: clock[0], process_metrics=False)
    value = metrics.registry.get_sample_value
    assert value("leader_sidecar_seconds_since_last_renew") is None
    metrics.acquired(0)
    clock[0] = 101.5
    assert value("leader_sidecar_seconds_since_last_renew") == 1.5
    metrics.renewed(0.004)
    clock[0] = 102.0
    assert value("leader_sidecar_seconds_since_last_renew") == 0.5


def test_api_requests_by_verb_and_errors_by_verb_and_code() -> None:
    metrics = Metrics(Broadcaster(initial()), process_metrics=False)
    metrics.api_request("PUT", "200", 0.003)
    metrics.api_request("PUT", "409", 0.002)
    metrics.api_request("WATCH", "200", 0.01)
    metrics.api_request("WATCH", "error", None)  # a watch stream broke later: no latency
    metrics.api_request("GET", "timeout", 10.0)
    value = metrics.registry.get_sample_value
    assert value("leader_sidecar_api_request_duration_seconds_count", {"verb": "PUT"}) == 2
    assert value("leader_sidecar_api_request_duration_seconds_count", {"verb": "WATCH"}) == 1
    assert value("leader_sidecar_api_request_errors_total", {"verb": "PUT", "code": "409"}) == 1
    assert value("leader_sidecar_api_request_errors_total", {"verb": "PUT", "code": "200"}) is None
    assert value("leader_sidecar_api_request_errors_total", {"verb": "WATCH", "code": "error"}) == 1
    assert value("leader_sidecar_api_request_errors_total", {"verb": "GET", "code": "timeout"}) == 1


def test_subscribers_are_counted_per_api_at_scrape_time() -> None:
    metrics = Metrics(Broadcaster(initial()), process_metrics=False)
    open_streams = {"sse": 0, "grpc": 0}
    metrics.count_subscribers("sse", lambda: open_streams["sse"])
    metrics.count_subscribers("grpc", lambda: open_streams["grpc"])
    open_streams.update(sse=3, grpc=7)
    value = metrics.registry.get_sample_value
    assert value("leader_sidecar_subscribers", {"api": "sse"}) == 3
    assert value("leader_sidecar_subscribers", {"api": "grpc"}) == 7


def test_the_exposition_follows_prometheus_conventions() -> None:
    metrics = Metrics(Broadcaster(initial()), election="shop", backend="local")
    metrics.acquired(0)
    metrics.renewed(0.01)
    metrics.renew_failed(LockConflict("x"))
    metrics.api_request("PUT", "500", 0.1)
    metrics.count_subscribers("sse", lambda: 1)
    body, content_type = metrics.render("*/*")
    assert content_type.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    ours = {name: f.type for name, f in families.items() if name.startswith("leader_sidecar_")}
    optional = {"leader_sidecar_lease_transitions"}  # no Lease observed in this test
    assert ours == {k: v for k, v in DOCUMENTED.items() if k not in optional}
    assert {name for name in families if not name.startswith("leader_sidecar_")} <= {
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_cpu_seconds",
        "process_open_fds",
        "process_max_fds",
    }
    for family in families.values():
        assert family.documentation, family.name
        for sample in family.samples:
            assert not sample.name.endswith("_created"), sample.name
    info = families["leader_sidecar_build_info"].samples[0]
    assert info.labels["version"] and info.labels["python_version"]
    assert b"# TYPE leader_sidecar_renew_attempts_total counter" in body
    open_metrics, open_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert open_type.startswith("application/openmetrics-text")
    assert open_metrics.endswith(b"# EOF\n")
