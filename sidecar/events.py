"""Kubernetes Events on this replica's Pod when it becomes leader and when it stops leading.

`events.k8s.io/v1` Events as client-go's leader election records them ("<id> became leader"),
so `kubectl describe pod` and `kubectl events` show handovers next to the Pod's other history.

Never in the elector's way: the elector's hook only puts a small dict into a bounded queue
(`put_nowait`); one background task sends them in order, each with a timeout, over a client of
its own. Rate-limited by a token bucket (a flapping election must not flood etcd); what does not
fit is dropped and counted. A 403 is logged once, naming the missing permission.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from sidecar.backends.kubeclient import ApiError, KubeApi, Unreachable
from sidecar.election.elector import ElectionObserver
from sidecar.election.record import format_microtime
from sidecar.metrics import Metrics

REPORTING_CONTROLLER = "leader-sidecar.io/leader-sidecar"
ACTION = "LeaderElection"
BECAME_LEADER = "BecameLeader"
STOPPED_LEADING = "StoppedLeading"
_MAX_FIELD = 128  # reportingInstance, reason, action
_MAX_NOTE = 1024


class TokenBucket:
    """`burst` events at once, then one more every `refill_seconds`."""

    def __init__(self, burst: int, refill_seconds: float, clock: Any = time.monotonic) -> None:
        self._burst = float(burst)
        self._tokens = float(burst)
        self._refill = refill_seconds
        self._clock = clock
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) / self._refill)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class LeaderEvents(ElectionObserver):
    def __init__(
        self,
        api: KubeApi,
        *,
        pod: str,
        pod_namespace: str,
        identity: str,
        lease_name: str,
        lease_namespace: str,
        pod_uid: str | None = None,
        metrics: Metrics | None = None,
        timeout: float = 5.0,
        burst: int = 10,
        refill_seconds: float = 60.0,
        queue_size: int = 16,
    ) -> None:
        self._api = api
        self._pod = pod
        self._namespace = pod_namespace
        self._identity = identity
        self._lease = (lease_name, lease_namespace)
        self._pod_uid = pod_uid
        self._looked_up_uid = bool(pod_uid)
        self._metrics = metrics
        self._timeout = timeout
        self._bucket = TokenBucket(burst, refill_seconds)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._log: Any = structlog.get_logger("events")
        self._told_forbidden = False
        self._told_dropping = False

    # ------------------------------------------------------- elector hooks

    def acquired(self, transitions: int) -> None:
        self._enqueue(BECAME_LEADER, f"{self._identity} became leader")

    def lost(self, reason: str) -> None:
        self._enqueue(STOPPED_LEADING, f"{self._identity} stopped leading: {reason}")

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._worker = asyncio.create_task(self._send_all(), name="kubernetes-events")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The sender (for supervision: it runs until `close()`)."""
        return self._worker

    async def close(self, timeout: float) -> None:
        """Send what is queued (at most `timeout` seconds), then stop."""
        if self._worker is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._queue.join()
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        await self._api.close()

    # ------------------------------------------------------------- internals

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.events.labels(result=result).inc()

    def _enqueue(self, reason: str, note: str) -> None:
        try:
            if not self._bucket.take():
                raise asyncio.QueueFull
            self._queue.put_nowait(self._event(reason, note, datetime.now(UTC)))
        except asyncio.QueueFull:
            self._count("dropped")
            if not self._told_dropping:
                self._told_dropping = True
                self._log.warning(
                    "dropping Kubernetes Events: leadership changes faster than the rate limit",
                    reason=reason,
                )

    def _event(self, reason: str, note: str, moment: datetime) -> dict[str, Any]:
        lease_name, lease_namespace = self._lease
        return {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            # client-go's naming: the object's name and the time in hex nanoseconds.
            "metadata": {
                "name": f"{self._pod}.{int(moment.timestamp() * 1e9):x}",
                "namespace": self._namespace,
            },
            "eventTime": format_microtime(moment),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self._identity[:_MAX_FIELD],
            "action": ACTION,
            "reason": reason,
            "type": "Normal",
            "note": note[:_MAX_NOTE],
            "regarding": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": self._pod,
                "namespace": self._namespace,
            },
            "related": {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "name": lease_name,
                "namespace": lease_namespace,
            },
        }

    async def _send_all(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._send(event)
            except Exception:  # a bug here must not end the election
                self._count("failed")
                self._log.exception("sending a Kubernetes Event failed")
            finally:
                self._queue.task_done()

    async def _send(self, event: dict[str, Any]) -> None:
        # `kubectl describe pod` finds Events by the Pod's uid: fill it in when we can (the
        # Downward API's metadata.uid as POD_UID, else one read of the Pod if RBAC allows).
        if not self._looked_up_uid:
            self._looked_up_uid = True
            with contextlib.suppress(ApiError, Unreachable, KeyError, TypeError):
                pod = await self._api.request(
                    "GET",
                    f"/api/v1/namespaces/{self._namespace}/pods/{self._pod}",
                    timeout=self._timeout,
                )
                self._pod_uid = str(pod["metadata"]["uid"])
        if self._pod_uid:
            event["regarding"]["uid"] = self._pod_uid
        path = f"/apis/events.k8s.io/v1/namespaces/{self._namespace}/events"
        try:
            await self._api.request("POST", path, event, timeout=self._timeout)
        except ApiError as exc:
            self._count("failed")
            if exc.status == 403:
                if not self._told_forbidden:
                    self._told_forbidden = True
                    self._log.warning(
                        "cannot send Kubernetes Events: RBAC denies 'create' on "
                        f"events.events.k8s.io in namespace {self._namespace!r}; grant it, "
                        "or turn --events off",
                        error=exc.message,
                    )
                return
            self._log.warning("Kubernetes Event not sent", reason=event["reason"], error=str(exc))
            return
        except Unreachable as exc:
            self._count("failed")
            self._log.warning("Kubernetes Event not sent", reason=event["reason"], error=str(exc))
            return
        self._count("sent")
        self._log.debug("Kubernetes Event sent", reason=event["reason"])
