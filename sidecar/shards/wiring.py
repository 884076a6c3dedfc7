"""`--shards N`: the shard Leases, the member registry, metrics and the runner, for app.py."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from sidecar.election.core import Timings
from sidecar.election.elector import LeadershipHooks
from sidecar.election.lock import LeaseLock
from sidecar.leadership import Broadcaster
from sidecar.naming import SHARD_LABEL, lease_labels
from sidecar.shards.members import (
    KubernetesMembers,
    LocalMembers,
    MemberRegistry,
    shard_lease_name,
)
from sidecar.shards.runner import ShardObserver, ShardRunner, initial_snapshot
from sidecar.shards.snapshot import ShardsBroadcaster

if TYPE_CHECKING:
    from sidecar.config import Settings

PREFIX = "leader_sidecar_"


class ShardMetrics(ShardObserver):
    def __init__(self, registry: Any, shards: int) -> None:
        self.owned_gauge = Gauge(
            PREFIX + "shards_owned", "Shards this replica owns now.", registry=registry
        )
        self.shards_gauge = Gauge(
            PREFIX + "shards", "Shards of the election (--shards).", registry=registry
        )
        self.shards_gauge.set(shards)
        self.moves = Counter(
            PREFIX + "shard_moves",
            "Shards this replica started owning (direction=acquired) or stopped owning "
            "(direction=lost).",
            ["direction"],
            registry=registry,
        )
        for direction in ("acquired", "lost"):
            self.moves.labels(direction=direction)

    def acquired(self, shard: int, transitions: int) -> None:
        self.moves.labels(direction="acquired").inc()

    def lost(self, shard: int, reason: str) -> None:
        self.moves.labels(direction="lost").inc()

    def owned(self, count: int) -> None:
        self.owned_gauge.set(count)


def open_shards(
    settings: Settings,
    backend: Any,
    leader: Broadcaster,
    hooks: LeadershipHooks | None,
    registry: Any,
) -> tuple[ShardRunner, ShardsBroadcaster]:
    """The runner for `settings.shards` shard Leases next to `backend`'s (app.py's _Backend)."""
    count = settings.shards
    assert count is not None
    names = [shard_lease_name(backend.lease_name, i) for i in range(count)]
    locks: list[LeaseLock] = []
    members: MemberRegistry
    if settings.backend == "local":
        from sidecar.backends.local import LocalLeaseLock

        assert settings.local_dir is not None
        locks = [LocalLeaseLock(settings.local_dir, name) for name in names]
        members = LocalMembers(settings.local_dir, backend.lease_name, settings.identity)
    else:
        from sidecar.backends.kubernetes import KubernetesLeaseLock

        labels = lease_labels(backend.election)
        locks = [
            KubernetesLeaseLock(
                backend.api,
                backend.namespace,
                name,
                {**labels, SHARD_LABEL: str(i)},
                request_timeout=settings.renew_deadline,
            )
            for i, name in enumerate(names)
        ]
        members = KubernetesMembers(
            backend.api,
            backend.namespace,
            backend.lease_name,
            settings.identity,
            labels,
            request_timeout=settings.renew_deadline,
        )
    shards = ShardsBroadcaster(
        initial_snapshot(settings.identity, count), retry_period=settings.retry_period
    )
    runner = ShardRunner(
        locks,
        members,
        settings.identity,
        Timings(settings.lease_duration, settings.renew_deadline, settings.retry_period),
        leader,
        shards,
        names,
        backend.namespace,
        hooks=hooks,
        observer=ShardMetrics(registry, count),
    )
    return runner, shards
