"""The checker itself, on made-up histories (no processes, no cluster)."""

from __future__ import annotations

from tests.chaos.recorder import Interval, Member, check

INF = float("inf")


class Fake:
    def __init__(self, name: str, *spans: tuple[float, float, int | None]) -> None:
        self.name = name
        self.spans = spans

    def intervals(self) -> list[Interval]:
        return [Interval(f"{self.name}[1]", self.name, s, e, t) for s, e, t in self.spans]

    def terminate(self) -> None:
        pass

    def stop(self) -> None:
        pass


def members(*fakes: Fake) -> list[Member]:
    return list(fakes)


def test_handovers_without_overlap_pass_and_are_measured() -> None:
    report = check(members(Fake("a", (0, 1, 0), (5, 6, 2)), Fake("b", (1.25, 3, 1), (7, INF, 3))))
    assert report.violations == []
    assert report.handovers == 3
    assert report.min_gap == 0.25
    assert report.max_leaderless == 2.0


def test_an_overlap_is_a_violation() -> None:
    report = check(members(Fake("a", (0, 2, 0)), Fake("b", (1.999, 3, 1))))
    assert len(report.violations) == 1 and "overlap" in report.violations[0]


def test_an_interval_inside_a_longer_one_is_a_violation() -> None:
    # c starts after b ended but while a (which started first) still leads.
    report = check(members(Fake("a", (0, 10, 0)), Fake("b", (0.5, 1, 1)), Fake("c", (2, 3, 2))))
    assert len(report.violations) == 2


def test_a_leader_that_never_stopped_blocks_everyone_after_it() -> None:
    report = check(members(Fake("a", (0, INF, 0)), Fake("b", (100, 101, 1))))
    assert len(report.violations) == 1


def test_fencing_tokens_must_grow_between_holders() -> None:
    report = check(members(Fake("a", (0, 1, 4)), Fake("b", (2, 3, 4))))
    assert any("fencing token" in v for v in report.violations)
    # The same identity taking its own Lease back keeps its token.
    same = check(members(Fake("a", (0, 1, 4)), Fake("a", (2, 3, 4))))
    assert same.violations == []
