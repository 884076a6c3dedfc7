"""Prometheus metrics, all prefixed `leader_sidecar_`, in a registry of their own.

Two kinds of source:
- events pushed by the elector (acquired, lost, renewed, renew failed) and by the Kubernetes
  client (one call per request), counted as they happen;
- state read at scrape time: `is_leader` from the Broadcaster's current snapshot (judged against
  its deadline *now*, as every API does), the age of the last successful renewal, open
  subscribers per API, the Lease's transition count.

The registry is not prometheus-client's global one: that one carries the platform and GC
collectors and is shared by everything imported into the process (tests start several HttpApis
in one process). The process collector is kept: it only reads /proc when scraped, and RSS and
CPU are what a sidecar is judged on.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from sidecar import __version__
from sidecar.election.elector import ElectionObserver
from sidecar.election.lock import LockConflict, LockForbidden
from sidecar.leadership import Broadcaster

PREFIX = "leader_sidecar_"
RENEW_FAILURE_REASONS = ("conflict", "timeout", "forbidden", "unavailable")
# `*_created` series double the output for counters nobody resets; Prometheus does not need them.
disable_created_metrics()  # type: ignore[no-untyped-call]
# A renewal is one PUT on a loopback or in-cluster API server: milliseconds, up to the renew
# deadline (seconds) when it struggles.
RENEW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
API_BUCKETS = RENEW_BUCKETS


def renew_failure_reason(exc: BaseException) -> str:
    """A small fixed set of label values (never an error message: unbounded cardinality)."""
    if isinstance(exc, LockConflict):
        return "conflict"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, LockForbidden):
        return "forbidden"
    return "unavailable"


class Metrics(ElectionObserver):
    """The sidecar's metrics. Its hook methods never raise and never block: the elector calls
    them between a write and its next decision."""

    def __init__(
        self,
        broadcaster: Broadcaster,
        *,
        election: str = "",
        backend: str = "",
        process_metrics: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self._broadcaster = broadcaster
        self._clock = clock
        self._election = election
        self._backend = backend
        self._last_write: float | None = None  # monotonic; last successful acquire or renew
        self._subscriber_counts: dict[str, Callable[[], int]] = {}
        registry = self.registry
        self.transitions = Counter(
            PREFIX + "leader_transitions",
            "Times this replica became leader (direction=acquired) or stopped leading "
            "(direction=lost).",
            ["direction"],
            registry=registry,
        )
        self.renew_attempts = Counter(
            PREFIX + "renew_attempts",
            "Renewals of the Lease this replica tried while leading.",
            registry=registry,
        )
        self.renew_failures = Counter(
            PREFIX + "renew_failures",
            "Renewals that failed, by reason: conflict (someone else wrote), timeout, "
            "forbidden (RBAC or credentials), unavailable (API server or lease file unusable).",
            ["reason"],
            registry=registry,
        )
        self.renew_duration = Histogram(
            PREFIX + "renew_duration_seconds",
            "Time a successful renewal took, from send to answer.",
            buckets=RENEW_BUCKETS,
            registry=registry,
        )
        self.api_duration = Histogram(
            PREFIX + "api_request_duration_seconds",
            "Kubernetes API requests: time to the response status, by HTTP verb (WATCH: "
            "opening a watch).",
            ["verb"],
            buckets=API_BUCKETS,
            registry=registry,
        )
        self.api_errors = Counter(
            PREFIX + "api_request_errors",
            "Kubernetes API requests that failed, by HTTP verb and status code (code=error: no "
            "answer, timeout: no answer in time).",
            ["verb", "code"],
            registry=registry,
        )
        self.events = Counter(
            PREFIX + "kubernetes_events",
            "Kubernetes Events about leadership, by result: sent, failed, dropped (rate limit).",
            ["result"],
            registry=registry,
        )
        for direction in ("acquired", "lost"):
            self.transitions.labels(direction=direction)
        for result in ("sent", "failed", "dropped"):
            self.events.labels(result=result)
        for reason in RENEW_FAILURE_REASONS:
            self.renew_failures.labels(reason=reason)
        registry.register(_ScrapeTime(self))
        if process_metrics:
            ProcessCollector(registry=registry)

    # ------------------------------------------------------- elector hooks

    def acquired(self, transitions: int) -> None:
        self._last_write = self._clock()
        self.transitions.labels(direction="acquired").inc()

    def lost(self, reason: str) -> None:
        self.transitions.labels(direction="lost").inc()

    def renewed(self, seconds: float) -> None:
        self._last_write = self._clock()
        self.renew_attempts.inc()
        self.renew_duration.observe(seconds)

    def renew_failed(self, exc: BaseException) -> None:
        self.renew_attempts.inc()
        self.renew_failures.labels(reason=renew_failure_reason(exc)).inc()

    # ------------------------------------------------------ other sources

    def api_request(self, verb: str, code: str, seconds: float | None) -> None:
        """One Kubernetes API request (the KubeApi observer): `code` is the HTTP status, or
        `error` / `timeout` when no answer came; `seconds` None when a watch broke later."""
        if seconds is not None:
            self.api_duration.labels(verb=verb).observe(seconds)
        if not code.startswith(("2", "3")):
            self.api_errors.labels(verb=verb, code=code).inc()

    def count_subscribers(self, api: str, count: Callable[[], int]) -> None:
        """Report `count()` at each scrape as `leader_sidecar_subscribers{api=...}`.

        HTTP registers its SSE streams as `sse`, gRPC its Watch streams as `grpc`.
        """
        self._subscriber_counts[api] = count

    def seconds_since_last_renew(self) -> float | None:
        if self._last_write is None:
            return None
        return max(0.0, self._clock() - self._last_write)

    # ----------------------------------------------------------- exposition

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type (OpenMetrics when the scraper asks)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def _collect_state(self) -> Iterable[Metric]:
        snapshot = self._broadcaster.current.as_of(self._clock())
        yield GaugeMetricFamily(
            PREFIX + "is_leader",
            "1 while this replica may act as leader (the same answer as GET /leader), else 0.",
            value=1.0 if snapshot.is_leader else 0.0,
        )
        known = GaugeMetricFamily(
            PREFIX + "leader_known",
            "1 when this replica has a fresh observation of the election (state is not "
            "'unknown'), else 0.",
            value=0.0 if snapshot.role.value == "unknown" else 1.0,
        )
        yield known
        age = self.seconds_since_last_renew()
        if age is not None:
            yield GaugeMetricFamily(
                PREFIX + "seconds_since_last_renew",
                "Seconds since this replica last wrote the Lease successfully (acquire or "
                "renew); absent until it first did.",
                value=age,
            )
        if snapshot.lease.transitions is not None:
            yield GaugeMetricFamily(
                PREFIX + "lease_transitions",
                "The Lease's leaseTransitions as last observed: grows by one per handover, in "
                "the whole election.",
                value=float(snapshot.lease.transitions),
            )
        subscribers = GaugeMetricFamily(
            PREFIX + "subscribers",
            "Open streams following the election, by API (sse, grpc).",
            labels=["api"],
        )
        for api, count in sorted(self._subscriber_counts.items()):
            subscribers.add_metric([api], float(count()))
        yield subscribers
        build = InfoMetricFamily(
            PREFIX + "build", "The running leader-sidecar and Python versions."
        )
        build.add_metric(
            ["version", "python_version"], {"version": __version__, "python_version": _PYTHON}
        )
        yield build
        election = InfoMetricFamily(
            PREFIX + "election",
            "The election this sidecar takes part in: its Lease, backend and identity.",
        )
        election.add_metric(
            ["election", "lease", "namespace", "identity", "backend"],
            {
                "election": self._election,
                "lease": snapshot.lease.name,
                "namespace": snapshot.lease.namespace,
                "identity": snapshot.identity,
                "backend": self._backend,
            },
        )
        yield election


_PYTHON = platform.python_version()


class _ScrapeTime(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics._collect_state())
