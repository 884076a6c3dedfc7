"""The election record on a `coordination.k8s.io/v1` Lease."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sidecar.backends.kubeclient import ApiError, KubeApi, Unreachable
from sidecar.election.lock import LockConflict, LockError, LockForbidden, LockUnavailable
from sidecar.election.record import LeaderRecord, VersionedRecord

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
WATCH_SECONDS = 300  # the server ends a watch after this; we then re-read and watch again
# With a leader, renewals arrive every retry period and bookmarks about once a minute: this
# much silence means the connection is dead, not the Lease quiet.
WATCH_IDLE_SECONDS = 90.0


class KubernetesLeaseLock:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        labels: dict[str, str],
        request_timeout: float,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._name = name
        self._labels = labels
        self._timeout = request_timeout
        self._collection = LEASES.format(namespace=namespace)

    @property
    def description(self) -> str:
        return f"{self._namespace}/{self._name}"

    async def get(self) -> VersionedRecord | None:
        try:
            lease = await self._call("GET", f"{self._collection}/{self._name}", "get")
        except _NotFound:
            return None
        return _versioned(lease)

    async def create(self, record: LeaderRecord) -> VersionedRecord:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self._name, "namespace": self._namespace, "labels": self._labels},
            "spec": record.to_spec(),
        }
        return _versioned(await self._call("POST", self._collection, "create", body))

    async def update(self, record: LeaderRecord, version: str) -> VersionedRecord:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self._name,
                "namespace": self._namespace,
                "labels": self._labels,
                "resourceVersion": version,
            },
            "spec": record.to_spec(),
        }
        try:
            lease = await self._call("PUT", f"{self._collection}/{self._name}", "update", body)
        except _NotFound as exc:
            raise LockConflict("the Lease was deleted") from exc
        return _versioned(lease)

    async def watch(self) -> AsyncIterator[VersionedRecord | None]:
        """Read the Lease, then follow it from that resourceVersion; ends when the server does.

        The watch is opened before the first record is yielded, so a watch the server refuses
        (RBAC) fails here rather than after a reading that looked healthy.
        """
        try:
            lease = await self._call("GET", f"{self._collection}/{self._name}", "get")
        except _NotFound:
            lease = None
            version = await self._collection_version()
        else:
            version = lease["metadata"]["resourceVersion"]
        query = {
            "watch": "true",
            "fieldSelector": f"metadata.name={self._name}",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        events = self._api.stream(
            self._collection, query, timeout=self._timeout, idle_timeout=WATCH_IDLE_SECONDS
        )
        try:
            await anext(events)  # OPENED
            yield _versioned(lease) if lease else None
            async for event in events:
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind in ("ADDED", "MODIFIED"):
                    yield _versioned(obj)
                elif kind == "DELETED":
                    yield None
                elif kind == "ERROR":
                    # 410 Gone: our version is too old; the caller re-reads and watches again.
                    if obj.get("code") == 410:
                        return
                    raise LockUnavailable(f"watch error: {obj.get('message', obj)}")
        except ApiError as exc:
            raise _translate(exc, "watch", self._namespace) from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc
        finally:
            await events.aclose()

    async def close(self) -> None:
        await self._api.close()

    async def _collection_version(self) -> str:
        """A resourceVersion to watch from when the Lease does not exist yet.

        A list needs the `list` verb, which least-privilege RBAC does not grant; "0" means
        "any version" and the API server then sends ADDED for an existing object, which is
        exactly what we want after a 404.
        """
        return "0"

    async def _call(self, method: str, path: str, verb: str, body: Any = None) -> Any:
        try:
            return await self._api.request(method, path, body, timeout=self._timeout)
        except ApiError as exc:
            if exc.status == 404 and exc.reason == "NotFound":
                raise _NotFound from exc
            raise _translate(exc, verb, self._namespace) from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc


class _NotFound(Exception):
    pass


def _translate(exc: ApiError, verb: str, namespace: str) -> LockError:
    if exc.status == 409:
        return LockConflict(exc.message or "conflict")
    if exc.status == 403:
        return LockForbidden(
            f"RBAC denies '{verb}' on leases.coordination.k8s.io in namespace {namespace!r}: "
            f"{exc.message}"
        )
    if exc.status == 401:
        return LockForbidden(f"the API server rejected our credentials (401): {exc.message}")
    if exc.status == 404:
        return LockUnavailable(
            f"the API server has no coordination.k8s.io/v1 leases ({exc.message or '404'})"
        )
    return LockUnavailable(f"the API server answered {exc}")


def _versioned(lease: dict[str, Any]) -> VersionedRecord:
    try:
        return VersionedRecord(
            record=LeaderRecord.from_spec(lease.get("spec")),
            version=str(lease["metadata"]["resourceVersion"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LockUnavailable(f"the Lease holds a record we cannot read: {exc!r}") from exc
