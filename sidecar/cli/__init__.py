"""The command line: `leader-sidecar run` (sidecar/cli/run.py) and `leader-sidecar status`
(sidecar/cli/status.py). Only argparse and the flag table load here; each command imports
what it needs once its flags are known to be good."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from sidecar import __version__
from sidecar.cli.run import ENV_PREFIX, GROUPS, OPTIONS, Option, settings_from_args
from sidecar.config import EXIT_CONFIG, ConfigError

__all__ = ["OPTIONS", "Option", "build_parser", "main", "settings_from_args"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as for every other configuration error.
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leader-sidecar",
        description="Leader election for the replicas of a Kubernetes workload, served to the "
        "app next to it on loopback: curl localhost:4040/leader.",
    )
    parser.add_argument("--version", action="version", version=f"leader-sidecar {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    run = commands.add_parser(
        "run",
        help="take part in the election and serve its state",
        description="Take part in the election and serve its state. Every flag can also be "
        f"set as an env var {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}LEASE_DURATION=15s); "
        "flags win over env vars.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = {key: run.add_argument_group(title) for key, title in GROUPS.items()}
    for option in OPTIONS:
        extra: dict[str, Any] = {}
        if option.boolean:
            extra.update(action="store_const", const="true")
        elif option.choices:
            extra["choices"] = option.choices
        else:
            extra["metavar"] = option.metavar or None
        default = f" (default {option.default})" if option.default else ""
        groups[option.group].add_argument(
            option.flag,
            *option.aliases,
            dest=option.dest,
            default=None,
            help=f"{option.help}{default} [env {option.env}]".strip(),
            **extra,
        )
    from sidecar.cli.status import add_parser as add_status_parser

    add_status_parser(commands)
    return parser


def _stop_before_start(signum: int, frame: object) -> None:
    # Until the event loop installs its handlers, SIGTERM/SIGINT end the process cleanly (as
    # PID 1 in a container, a signal without a handler would be ignored).
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "status":
        from sidecar.cli.status import run_status

        return run_status(args)
    previous = {s: signal.signal(s, _stop_before_start) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"leader-sidecar: error: {exc}", file=sys.stderr)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        return EXIT_CONFIG
    from sidecar.app import run  # heavy imports only once the flags are known to be good

    return run(settings)
