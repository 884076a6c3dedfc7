"""`python -m tests.sim --seeds 1000000` (a soak), or `--replay SEED` for one seed's trace."""

from __future__ import annotations

import argparse

from tests.sim.sweep import sweep
from tests.sim.world import Violation, simulate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim")
    parser.add_argument("--seeds", type=int, default=10_000)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--replay", type=int, default=None, help="print one seed's trace")
    args = parser.parse_args()
    if args.replay is not None:
        try:
            replayed = simulate(args.replay, trace=True)
            print("\n".join(replayed.trace))
            print(f"seed {args.replay}: no violation; faults {', '.join(replayed.faults)}")
        except Violation as exc:
            print(exc)
            return 1
        return 0
    result = sweep(args.seeds, args.first, args.workers)
    for line in result.describe():
        print(line)
    for violation in result.violations[:20]:
        print(violation)
    return 1 if result.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
