"""The Lease record as client-go writes it, and the Kubernetes MicroTime codec."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

_MICROTIME = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


def format_microtime(moment: datetime) -> str:
    """RFC 3339 in UTC with exactly six fractional digits and `Z`.

    The API server rejects MicroTime without six digits, which `isoformat()` drops when the
    microseconds are zero; so we always format it ourselves.
    """
    if moment.tzinfo is None:
        raise ValueError("MicroTime needs an aware datetime")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_microtime(text: str) -> datetime:
    """Parse RFC 3339 as the API server and client-go write it (0 to 9 fractional digits)."""
    match = _MICROTIME.match(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    moment = datetime(
        int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tzinfo=UTC
    )
    if zone not in ("Z", "z"):
        return datetime.fromisoformat(moment.replace(tzinfo=None).isoformat() + zone).astimezone(
            UTC
        )
    return moment


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """The five fields of a Lease's spec that client-go's LeaseLock reads and writes."""

    holder_identity: str = ""
    lease_duration_seconds: int = 0
    acquire_time: datetime | None = None
    renew_time: datetime | None = None
    lease_transitions: int = 0

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "holderIdentity": self.holder_identity,
            "leaseDurationSeconds": self.lease_duration_seconds,
            "leaseTransitions": self.lease_transitions,
        }
        if self.acquire_time is not None:
            spec["acquireTime"] = format_microtime(self.acquire_time)
        if self.renew_time is not None:
            spec["renewTime"] = format_microtime(self.renew_time)
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | None) -> LeaderRecord:
        """Read a Lease spec; absent fields read as client-go reads them (zero values)."""
        spec = spec or {}
        acquire = spec.get("acquireTime")
        renew = spec.get("renewTime")
        return cls(
            holder_identity=str(spec.get("holderIdentity") or ""),
            lease_duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=parse_microtime(acquire) if acquire else None,
            renew_time=parse_microtime(renew) if renew else None,
            lease_transitions=int(spec.get("leaseTransitions") or 0),
        )

    def released(self, now: datetime) -> LeaderRecord:
        """What client-go writes on release: no holder, a 1 s lease, transitions kept."""
        return replace(
            self, holder_identity="", lease_duration_seconds=1, acquire_time=now, renew_time=now
        )


@dataclass(frozen=True, slots=True)
class VersionedRecord:
    """A record with the backend's version of it (a resourceVersion for a Lease)."""

    record: LeaderRecord
    version: str
