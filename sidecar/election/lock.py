"""The one interface the elector needs from a backend (a Kubernetes Lease or a local file)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from sidecar.election.record import LeaderRecord, VersionedRecord


class LockError(Exception):
    """The backend could not answer; the message says why in words an operator can act on."""


class LockUnavailable(LockError):
    """The backend is unreachable or failing (network, timeout, 5xx): try again later."""


class LockForbidden(LockError):
    """The backend refused us (401/403): retrying will not help until permissions change."""


class LockConflict(LockError):
    """Someone else wrote first (HTTP 409 or a version mismatch): re-read, then decide."""


class LeaseLock(Protocol):
    """Compare-and-swap on one leader record, plus a stream of its changes."""

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
        """Replace the record if it is still at `version`; LockConflict otherwise."""
        ...

    def watch(self) -> AsyncIterator[VersionedRecord | None]:
        """Yield the current record at once, then every change (None: deleted).

        Ends only by cancellation; errors are raised so that the caller can back off.
        """
        ...

    async def close(self) -> None: ...
