"""The election record on a `coordination.k8s.io/v1` Lease.

Every call ends in a VersionedRecord (or None) or a LockError: an answer that is not a Lease
(HTML from a proxy, a JSON array, a bad MicroTime) is a LockUnavailable that says what came
back, never another exception.

Updates keep what others own. The lock remembers the last few Lease objects it saw (through
get, create, update and watch) by resourceVersion; an update at a version starts from that
object and replaces only the five record fields, so annotations, labels, ownerReferences,
finalizers and spec fields such as `strategy` or `preferredHolder` are carried over, as
client-go does.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import Any

from sidecar.backends.kubeclient import ApiError, KubeApi, Unreachable
from sidecar.election.lock import (
    LockConflict,
    LockError,
    LockForbidden,
    LockNotFound,
    LockUnavailable,
)
from sidecar.election.record import LeaderRecord, VersionedRecord

LEASES = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
WATCH_SECONDS = 300  # the server ends a watch after this; we then re-read and watch again
# With a leader, renewals arrive every retry period and bookmarks about once a minute: this
# much silence means the connection is dead, not the Lease quiet. The watch then ends quietly
# and the caller's next read finds out whether the API server is still there.
WATCH_IDLE_SECONDS = 90.0
RECORD_FIELDS = (
    "holderIdentity",
    "leaseDurationSeconds",
    "acquireTime",
    "renewTime",
    "leaseTransitions",
)
REMEMBERED = 8  # Lease objects kept by resourceVersion, for updates to start from
# Set by the API server and refused or pointless in a PUT.
SERVER_MANAGED = ("managedFields", "selfLink")


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
        self._seen: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @property
    def description(self) -> str:
        return f"{self._namespace}/{self._name}"

    async def get(self) -> VersionedRecord | None:
        lease = await self._call("GET", f"{self._collection}/{self._name}", "get")
        return None if lease is None else self._versioned(lease)

    async def create(self, record: LeaderRecord) -> VersionedRecord:
        body = self._fresh(record)
        lease = await self._call("POST", self._collection, "create", body)
        return self._versioned(_require(lease, "create"))

    async def update(self, record: LeaderRecord, version: str) -> VersionedRecord:
        body = self._carried_over(record, version)
        lease = await self._call("PUT", f"{self._collection}/{self._name}", "update", body)
        return self._versioned(_require(lease, "update"))

    async def watch(self) -> AsyncGenerator[VersionedRecord | None, None]:
        """Read the Lease, then follow it from that resourceVersion; ends when the server does
        (its timeout, 410 Gone, or WATCH_IDLE_SECONDS without a line).

        The watch is opened before the first record is yielded, so a watch the server refuses
        (RBAC) fails here rather than after a reading that looked healthy.
        """
        lease = await self._call("GET", f"{self._collection}/{self._name}", "get")
        current = None if lease is None else self._versioned(lease)
        query = {
            "watch": "true",
            "fieldSelector": f"metadata.name={self._name}",
            # "0" when there is no Lease: "any version"; the API server then sends ADDED for
            # one created meanwhile. Listing for a version would need the `list` verb, which
            # least-privilege RBAC does not grant.
            "resourceVersion": current.version if current else "0",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        events = self._api.stream(
            self._collection, query, timeout=self._timeout, idle_timeout=WATCH_IDLE_SECONDS
        )
        try:
            await anext(events)  # OPENED
            yield current
            async for event in events:
                kind, obj = _event(event)
                if kind in ("ADDED", "MODIFIED"):
                    yield self._versioned(obj)
                elif kind == "DELETED":
                    yield None
                elif kind == "ERROR":
                    # 410 Gone: our version is too old; the caller re-reads and watches again.
                    if obj.get("code") == 410:
                        return
                    raise LockUnavailable(f"the Lease watch failed: {obj.get('message', obj)}")
                # BOOKMARK: only tells that the watch is alive; nothing to do.
        except StopAsyncIteration:
            return  # the stream ended before it opened (cannot happen; not an error either)
        except ApiError as exc:
            raise _translate(exc, "watch", self._namespace) from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc
        finally:
            await events.aclose()

    async def close(self) -> None:
        await self._api.close()

    # ------------------------------------------------------------------ bodies

    def _fresh(self, record: LeaderRecord) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self._name,
                "namespace": self._namespace,
                "labels": dict(self._labels),
            },
            "spec": record.to_spec(),
        }

    def _carried_over(self, record: LeaderRecord, version: str) -> dict[str, Any]:
        """The Lease as it was at `version`, with our record and labels in it."""
        seen = self._seen.get(version)
        if seen is None:  # not one we saw (the caller invented it?): a Lease of our own
            body = self._fresh(record)
            body["metadata"]["resourceVersion"] = version
            return body
        body = copy.deepcopy(seen)
        body["apiVersion"], body["kind"] = "coordination.k8s.io/v1", "Lease"
        metadata = body["metadata"]
        for field in SERVER_MANAGED:
            metadata.pop(field, None)
        metadata["resourceVersion"] = version
        metadata["labels"] = {**(metadata.get("labels") or {}), **self._labels}
        spec = {k: v for k, v in (body.get("spec") or {}).items() if k not in RECORD_FIELDS}
        body["spec"] = {**spec, **record.to_spec()}
        return body

    def _versioned(self, lease: Any) -> VersionedRecord:
        """Check that `lease` is a Lease, remember it, and read its record."""
        try:
            if not isinstance(lease, dict):
                raise ValueError(f"a JSON {type(lease).__name__}, not an object")
            metadata = lease.get("metadata")
            if not isinstance(metadata, dict):
                raise ValueError("no metadata")
            version = metadata.get("resourceVersion")
            if not isinstance(version, str) or not version:
                raise ValueError("no metadata.resourceVersion")
            spec = lease.get("spec")
            if spec is not None and not isinstance(spec, dict):
                raise ValueError(f"spec is a JSON {type(spec).__name__}, not an object")
            record = LeaderRecord.from_spec(spec)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise LockUnavailable(
                f"the API server answered something that is not a Lease ({exc}): {_preview(lease)}"
            ) from exc
        self._seen[version] = lease
        self._seen.move_to_end(version)
        while len(self._seen) > REMEMBERED:
            self._seen.popitem(last=False)
        return VersionedRecord(record=record, version=version)

    # ------------------------------------------------------------------ calls

    async def _call(self, method: str, path: str, verb: str, body: Any = None) -> Any:
        """The decoded answer; None for a GET of a Lease that does not exist."""
        try:
            return await self._api.request(method, path, body, timeout=self._timeout)
        except ApiError as exc:
            if verb == "get" and exc.status == 404 and exc.reason == "NotFound":
                return None
            raise _translate(exc, verb, self._namespace) from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc


def _require(lease: Any, verb: str) -> Any:
    if lease is None:
        raise LockUnavailable(f"the API server answered the Lease {verb} with an empty body")
    return lease


def _event(event: Any) -> tuple[str, dict[str, Any]]:
    """A watch event's type and object; LockUnavailable if it is not shaped like one."""
    if isinstance(event, dict):
        kind, obj = event.get("type"), event.get("object")
        if isinstance(kind, str) and isinstance(obj, dict):
            return kind, obj
    raise LockUnavailable(f"the API server sent a watch event we cannot read: {_preview(event)}")


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "..."


def _translate(exc: ApiError, verb: str, namespace: str) -> LockError:
    retry_after = exc.retry_after
    if exc.status == 409:
        return LockConflict(exc.message or "conflict", retry_after=retry_after)
    if exc.status == 403:
        return LockForbidden(
            f"RBAC denies '{verb}' on leases.coordination.k8s.io in namespace {namespace!r}: "
            f"{exc.message}",
            retry_after=retry_after,
        )
    if exc.status == 401:
        return LockForbidden(
            f"the API server rejected our credentials (401): {exc.message}",
            retry_after=retry_after,
        )
    if exc.status == 404 and verb == "update" and exc.reason == "NotFound":
        return LockNotFound(f"the Lease was deleted: {exc.message}", retry_after=retry_after)
    if exc.status == 404:
        return LockUnavailable(
            f"namespace {namespace!r} does not exist or the API server has no "
            f"coordination.k8s.io/v1 leases ({exc.message or '404'})",
            retry_after=retry_after,
        )
    return LockUnavailable(f"the API server answered {exc}", retry_after=retry_after)
