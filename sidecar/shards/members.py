"""Member records: how replicas of a sharded election announce that they are alive.

Each replica owns one small record of its own (a Lease named `<lease>-m-<hash of identity>` in
Kubernetes, labelled with the election's Lease name; a file next to the lease files locally),
holding the same five fields as a shard Lease: its identity, `leaseDurationSeconds` and a
`renewTime` that moves at every renewal. Nobody else writes it. Observers judge it like a lease,
by observed time (sidecar/shards/core.py): it lives while it keeps changing.

`watch()` yields the full set of member records at once and after every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from sidecar.election.lock import LockError, LockUnavailable
from sidecar.election.record import LeaderRecord
from sidecar.naming import MEMBER_LABEL


def member_name(lease_name: str, identity: str) -> str:
    """A valid object name for `identity`'s member record, whatever the identity holds."""
    return f"{lease_name}-m-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def shard_lease_name(lease_name: str, shard: int) -> str:
    return f"{lease_name}-{shard}"


def member_label_value(lease_name: str) -> str:
    if len(lease_name) <= 63:
        return lease_name
    return "sha256-" + hashlib.sha256(lease_name.encode()).hexdigest()[:16]


class MemberRegistry(Protocol):
    @property
    def description(self) -> str: ...

    async def announce(self, record: LeaderRecord) -> None:
        """Write our own member record (create it, or replace it)."""
        ...

    async def withdraw(self) -> None:
        """Remove our own member record."""
        ...

    async def forget(self, identity: str) -> None:
        """Remove another member's record (long silent); gone already is fine."""
        ...

    def watch(self) -> AsyncIterator[dict[str, LeaderRecord]]:
        """Every member record by identity, at once and after every change. Returns when the
        server ends the watch; raises LockError on failures."""
        ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------------------- Kubernetes


class KubernetesMembers:
    """Member Leases, found by label (list + watch on Leases in the namespace)."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        lease_name: str,
        identity: str,
        labels: dict[str, str],
        request_timeout: float,
    ) -> None:
        from sidecar.backends.kubernetes import LEASES

        self._api = api
        self._namespace = namespace
        self._identity = identity
        self._lease_name = lease_name
        self._name = member_name(lease_name, identity)
        self._selector = f"{MEMBER_LABEL}={member_label_value(lease_name)}"
        self._labels = {**labels, MEMBER_LABEL: member_label_value(lease_name)}
        self._timeout = request_timeout
        self._collection = LEASES.format(namespace=namespace)
        self._version: str | None = None

    @property
    def description(self) -> str:
        return f"{self._namespace}/{self._name}"

    async def announce(self, record: LeaderRecord) -> None:
        from sidecar.backends.kubeclient import ApiError, Unreachable

        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self._name, "namespace": self._namespace, "labels": self._labels},
            "spec": record.to_spec(),
        }
        try:
            if self._version is None:
                try:
                    created = await self._api.request(
                        "POST", self._collection, body, timeout=self._timeout
                    )
                    self._version = _version(created)
                    return
                except ApiError as exc:
                    if exc.status != 409:
                        raise
                    found = await self._api.request(
                        "GET", f"{self._collection}/{self._name}", timeout=self._timeout
                    )
                    self._version = _version(found)
            body["metadata"]["resourceVersion"] = self._version
            try:
                updated = await self._api.request(
                    "PUT", f"{self._collection}/{self._name}", body, timeout=self._timeout
                )
                self._version = _version(updated)
            except ApiError as exc:
                self._version = None  # 409 or 404: start again from a create next time
                raise LockUnavailable(f"member record: {exc}") from exc
        except ApiError as exc:
            raise LockUnavailable(f"member record: {exc}") from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc

    async def withdraw(self) -> None:
        from sidecar.backends.kubeclient import ApiError, Unreachable

        self._version = None
        try:
            await self._api.request(
                "DELETE", f"{self._collection}/{self._name}", timeout=self._timeout
            )
        except ApiError as exc:
            if exc.status != 404:
                raise LockUnavailable(f"member record: {exc}") from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc

    async def forget(self, identity: str) -> None:
        from sidecar.backends.kubeclient import ApiError, Unreachable

        name = member_name(self._lease_name, identity)
        try:
            await self._api.request("DELETE", f"{self._collection}/{name}", timeout=self._timeout)
        except ApiError as exc:
            if exc.status != 404:
                raise LockUnavailable(f"member record of {identity}: {exc}") from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc

    async def watch(self) -> AsyncGenerator[dict[str, LeaderRecord], None]:
        from sidecar.backends.kubeclient import ApiError, Unreachable
        from sidecar.backends.kubernetes import WATCH_IDLE_SECONDS, WATCH_SECONDS

        try:
            listed = await self._api.request(
                "GET",
                self._collection,
                timeout=self._timeout,
                query={"labelSelector": self._selector},
            )
        except ApiError as exc:
            raise LockUnavailable(f"listing member Leases: {exc}") from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc
        if not isinstance(listed, dict) or not isinstance(listed.get("items"), list):
            raise LockUnavailable("listing member Leases: not a LeaseList")
        members: dict[str, tuple[str, LeaderRecord]] = {}  # object name -> identity, record
        for item in listed["items"]:
            _remember(members, item)
        version = (listed.get("metadata") or {}).get("resourceVersion") or "0"
        query = {
            "watch": "true",
            "labelSelector": self._selector,
            "resourceVersion": str(version),
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        events = self._api.stream(
            self._collection, query, timeout=self._timeout, idle_timeout=WATCH_IDLE_SECONDS
        )
        try:
            await anext(events)  # OPENED
            yield _by_identity(members)
            async for event in events:
                kind = event.get("type") if isinstance(event, dict) else None
                obj = event.get("object") if isinstance(event, dict) else None
                if not isinstance(obj, dict):
                    raise LockUnavailable("member watch: an event we cannot read")
                if kind in ("ADDED", "MODIFIED"):
                    _remember(members, obj)
                elif kind == "DELETED":
                    members.pop(str((obj.get("metadata") or {}).get("name")), None)
                elif kind == "ERROR":
                    if obj.get("code") == 410:
                        return
                    raise LockUnavailable(f"member watch failed: {obj.get('message', obj)}")
                else:
                    continue
                yield _by_identity(members)
        except StopAsyncIteration:
            return
        except ApiError as exc:
            raise LockUnavailable(f"member watch: {exc}") from exc
        except Unreachable as exc:
            raise LockUnavailable(str(exc)) from exc
        finally:
            await events.aclose()

    async def close(self) -> None:
        return None


def _version(lease: Any) -> str:
    try:
        version = lease["metadata"]["resourceVersion"]
    except (TypeError, KeyError) as exc:
        raise LockUnavailable("member record: the answer is not a Lease") from exc
    if not isinstance(version, str):
        raise LockUnavailable("member record: the answer is not a Lease")
    return version


def _remember(members: dict[str, tuple[str, LeaderRecord]], lease: Any) -> None:
    """Keep a member Lease that holds a readable record; skip anything else."""
    try:
        name = str(lease["metadata"]["name"])
        record = LeaderRecord.from_spec(lease.get("spec"))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        return
    if record.holder_identity:
        members[name] = (record.holder_identity, record)
    else:
        members.pop(name, None)


def _by_identity(members: dict[str, tuple[str, LeaderRecord]]) -> dict[str, LeaderRecord]:
    return {identity: record for identity, record in members.values()}


# ------------------------------------------------------------------------------------ local


class LocalMembers:
    """Member files `<lease>-m-<hash>.member.json` in the lease directory, polled."""

    POLL_SECONDS = 0.05

    def __init__(self, directory: Path, lease_name: str, identity: str) -> None:
        self._dir = directory
        self._lease_name = lease_name
        self._prefix = f"{lease_name}-m-"
        self._path = directory / f"{member_name(lease_name, identity)}.member.json"

    @property
    def description(self) -> str:
        return str(self._path)

    async def announce(self, record: LeaderRecord) -> None:
        temp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        try:
            temp.write_text(json.dumps({"spec": record.to_spec()}))
            os.replace(temp, self._path)
        except OSError as exc:
            raise LockUnavailable(f"cannot write {self._path}: {exc}") from exc

    async def withdraw(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def forget(self, identity: str) -> None:
        path = self._dir / f"{member_name(self._lease_name, identity)}.member.json"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _scan(self) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        try:
            for path in self._dir.glob(f"{self._prefix}*.member.json"):
                with contextlib.suppress(OSError):
                    found[path.name] = path.read_bytes()
        except OSError as exc:
            raise LockUnavailable(f"cannot list {self._dir}: {exc}") from exc
        return found

    @staticmethod
    def _parse(files: dict[str, bytes]) -> dict[str, LeaderRecord]:
        members: dict[str, LeaderRecord] = {}
        for raw in files.values():
            try:
                record = LeaderRecord.from_spec(json.loads(raw)["spec"])
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
                continue
            if record.holder_identity:
                members[record.holder_identity] = record
        return members

    async def watch(self) -> AsyncGenerator[dict[str, LeaderRecord], None]:
        files = self._scan()
        yield self._parse(files)
        while True:
            await asyncio.sleep(self.POLL_SECONDS)
            latest = self._scan()
            if latest != files:
                files = latest
                yield self._parse(files)

    async def close(self) -> None:
        return None


__all__ = [
    "KubernetesMembers",
    "LocalMembers",
    "LockError",
    "MemberRegistry",
    "member_name",
    "shard_lease_name",
]
