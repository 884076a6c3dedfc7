"""How the rollout measurements read a Lease's history (no cluster needed)."""

from __future__ import annotations

from tests.kube.leasewatch import Seen, changes_between


def seen(at: float, holder: str, transitions: int = 0) -> Seen:
    return Seen(at=at, holder=holder, transitions=transitions, duration=15.0, event="MODIFIED")


def test_a_release_and_a_new_holder_is_one_change_with_the_gap_between_them() -> None:
    events = [seen(0, "a"), seen(2, "a"), seen(10.0, ""), seen(10.05, "b", 1), seen(12, "b", 1)]
    c = changes_between(events, start=1, end=20)
    assert c.holders == ["a", "b"] and c.changes == 1
    assert [round(g, 3) for g in c.leaderless] == [0.05]


def test_leadership_moving_through_old_pods_counts_every_change() -> None:
    events = [seen(0, "old-1"), seen(5, ""), seen(5.1, "old-2"), seen(9, ""), seen(9.2, "new-1")]
    c = changes_between(events, start=1, end=20)
    assert c.holders == ["old-1", "old-2", "new-1"] and c.changes == 2
    assert [round(g, 3) for g in c.leaderless] == [0.1, 0.2]


def test_a_takeover_without_release_is_leaderless_from_the_expiry_of_the_last_renewal() -> None:
    events = [seen(0, "a"), seen(2, "a"), seen(18.5, "b", 1)]
    c = changes_between(events, start=1, end=30)
    assert c.changes == 1 and [round(g, 3) for g in c.leaderless] == [1.5]


def test_renewals_and_events_outside_the_window_change_nothing() -> None:
    events = [seen(0, "a"), seen(2, "a"), seen(4, "a"), seen(30, ""), seen(31, "b")]
    c = changes_between(events, start=1, end=20)
    assert c.holders == ["a"] and c.changes == 0 and c.leaderless == []
