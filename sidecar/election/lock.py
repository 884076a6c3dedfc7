"""The one interface the election needs from a backend (a Kubernetes Lease or a local file).

Errors are typed so that the election core can tell a definite answer (conflict, not found,
forbidden) from one that leaves the outcome of a write unknown (unavailable, malformed, timeout).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from sidecar.election.record import LeaderRecord, VersionedRecord


class LockError(Exception):
    """The backend could not answer; the message says why in words an operator can act on.

    `retry_after` (seconds) is the backend's own request to wait (HTTP 429/503 Retry-After).
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LockUnavailable(LockError):
    """The backend is unreachable, failing (5xx, 429) or answered something that is not a
    Lease (HTML from a proxy, wrong JSON shape): try again later. A write that ends like this
    may or may not have been applied."""


class LockForbidden(LockError):
    """The backend refused us (401/403): retrying will not help until permissions change."""


class LockConflict(LockError):
    """Someone else wrote first: an update's version is stale (HTTP 409), or a create found
    the record already there (AlreadyExists). Re-read, then decide."""


class LockNotFound(LockError):
    """An update found no record to update (it was deleted). Not raised by `get`, which
    answers None instead."""


class LeaseLock(Protocol):
    """Compare-and-swap on one leader record, plus a stream of its changes.

    Versions are opaque strings: equal or not, never older or newer (an etcd restore rewinds
    them). An update keeps whatever the backend holds besides the five record fields
    (annotations, labels, owner references, other spec fields) as it was at `version`.
    """

    @property
    def description(self) -> str:
        """Where the record lives, for logs and the API (e.g. `default/leader-sidecar-ab12`)."""
        ...

    async def get(self) -> VersionedRecord | None:
        """The current record, or None when it does not exist."""
        ...

    async def create(self, record: LeaderRecord) -> VersionedRecord:
        """Create the record; LockConflict when it already exists."""
        ...

    async def update(self, record: LeaderRecord, version: str) -> VersionedRecord:
        """Replace the record if it is still at `version`; LockConflict if it moved on,
        LockNotFound if it is gone."""
        ...

    def watch(self) -> AsyncIterator[VersionedRecord | None]:
        """Yield the current record at once, then every change (None: deleted).

        Returns normally when the server ends the watch (timeout, 410 Gone, idle); the caller
        then watches again. Raises LockError on failures, so that the caller can back off.
        """
        ...

    async def close(self) -> None: ...
