"""`leader-sidecar status`: the elections in a cluster, like `kubectl get`.

Lists the Leases labelled `app.kubernetes.io/managed-by=leader-sidecar` (their
`leader-sidecar.io/election` label names the election) with holder, age of the last renewal,
transitions, and whether the Lease looks expired; with `--shards N` each shard Lease is a row
(`shop[3]`: shard 3's owner is its holder), and each replica's member Lease (`shop[member]`).
`--watch` then prints a row whenever a holder,
the transition count or the expired look changes (not for every renewal).

"Looks expired" compares the holder's `renewTime + leaseDurationSeconds` with this machine's
clock: a hint for display only. The sidecars themselves never compare clocks; they judge expiry
by the time they observed the record change.

Only argparse is imported at module level: `leader-sidecar run` builds this parser too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.config import EXIT_CONFIG, EXIT_OK
from sidecar.config import EXIT_FATAL as EXIT_ERROR
from sidecar.election.record import format_microtime, parse_microtime
from sidecar.naming import (
    ELECTION_LABEL,
    MANAGED_SELECTOR,
    MEMBER_LABEL,
    SHARD_LABEL,
    explain_api_error,
    is_dns_label,
)

if TYPE_CHECKING:
    from sidecar.backends.kubeclient import KubeApi

EXPIRED_NOTE = (
    "EXPIRED compares renewTime + leaseDurationSeconds with this machine's clock: a display "
    "hint only (the sidecars judge expiry by observed time, never by comparing clocks)"
)
REQUEST_TIMEOUT = 10.0
WATCH_SECONDS = 300


class StatusError(Exception):
    """Something a person must fix (credentials, RBAC, reachability): one line, exit 1."""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "status",
        help="list the elections in a cluster (Leases managed by leader-sidecar)",
        description="List the Leases labelled app.kubernetes.io/managed-by=leader-sidecar: "
        "election, holder, age of the last renewal, transitions, and whether the Lease looks "
        "expired. " + EXPIRED_NOTE + ".",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        help="namespace to list (default: the kubeconfig context's, else 'default')",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="list the elections of every namespace"
    )
    parser.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="after the list, print a row whenever a holder, the transitions or the expired "
        "look change (JSON: one object per line); Ctrl-C ends it",
    )
    parser.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="(default table)"
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, else in-cluster)",
    )
    parser.add_argument("--context", metavar="NAME", help="kubeconfig context to use")


def run_status(args: argparse.Namespace) -> int:
    if args.namespace is not None and not is_dns_label(args.namespace):
        return _fail(f"--namespace {args.namespace!r} is not a valid namespace name", EXIT_CONFIG)
    kubeconfig = _kubeconfig(args.kubeconfig)
    if kubeconfig is None:
        from sidecar.backends.kubeclient import in_cluster

        if not in_cluster():
            return _fail(
                "no cluster credentials: pass --kubeconfig, set KUBECONFIG, or run in a pod",
                EXIT_CONFIG,
            )
    elif not Path(kubeconfig).is_file():
        return _fail(f"--kubeconfig {kubeconfig}: no such file", EXIT_CONFIG)
    try:
        return asyncio.run(_status(args, kubeconfig))
    except StatusError as exc:
        return _fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:  # `status | head`
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
        return EXIT_OK


def _fail(message: str, code: int) -> int:
    print(f"leader-sidecar status: error: {message}", file=sys.stderr)
    return code


def _kubeconfig(flag: str | None) -> str | None:
    if flag:
        return flag
    env = os.environ.get("KUBECONFIG", "")
    for path in env.split(os.pathsep):
        if path and Path(path).is_file():
            return path
    default = Path.home() / ".kube" / "config"
    return str(default) if default.is_file() else None


# ------------------------------------------------------------------ rows


@dataclass(frozen=True)
class Election:
    namespace: str
    lease: str
    election: str
    holder: str
    acquire_time: datetime | None
    renew_time: datetime | None
    duration_seconds: int | None
    transitions: int | None
    deleted: bool = False
    shard: int | None = None  # a shard Lease of `--shards N` (label leader-sidecar.io/shard)
    member: bool = False  # a member Lease of `--shards N` (label leader-sidecar.io/member-of)

    @classmethod
    def from_lease(cls, lease: dict[str, Any], deleted: bool = False) -> Election:
        meta = lease.get("metadata") or {}
        spec = lease.get("spec") or {}
        labels = meta.get("labels") or {}
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        shard = labels.get(SHARD_LABEL)
        return cls(
            namespace=str(meta.get("namespace", "")),
            lease=str(meta.get("name", "")),
            election=str(labels.get(ELECTION_LABEL, "")),
            holder=str(spec.get("holderIdentity") or ""),
            acquire_time=_parse_time(spec.get("acquireTime")),
            renew_time=_parse_time(spec.get("renewTime")),
            duration_seconds=int(duration) if isinstance(duration, int) else None,
            transitions=int(transitions) if isinstance(transitions, int) else None,
            deleted=deleted,
            shard=int(shard) if isinstance(shard, str) and shard.isdigit() else None,
            member=MEMBER_LABEL in labels,
        )

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.lease

    def looks_expired(self, now: datetime) -> bool | None:
        """None when there is nothing to expire (no holder) or nothing to judge by."""
        if not self.holder or self.renew_time is None or self.duration_seconds is None:
            return None
        return self.renew_time + timedelta(seconds=self.duration_seconds) < now

    def facts(self, now: datetime) -> tuple[Any, ...]:
        """What a watch reports a change of (a renewal alone moves only the time)."""
        return (
            self.election,
            self.holder,
            self.transitions,
            self.duration_seconds,
            self.deleted,
            self.looks_expired(now),
        )

    def to_dict(self, now: datetime) -> dict[str, Any]:
        age = (now - self.renew_time).total_seconds() if self.renew_time else None
        return {
            "namespace": self.namespace,
            "election": self.election or None,
            "lease": self.lease,
            "holder": self.holder or None,
            "acquire_time": _format_time(self.acquire_time),
            "renew_time": _format_time(self.renew_time),
            "last_renew_seconds_ago": round(age, 3) if age is not None else None,
            "lease_duration_seconds": self.duration_seconds,
            "transitions": self.transitions,
            "looks_expired": self.looks_expired(now),
            "deleted": self.deleted,
            "shard": self.shard,
            "member": self.member,
        }

    @property
    def title(self) -> str:
        """The election, with the shard (`shop[3]`) or `[member]` for `--shards` Leases."""
        name = self.election or "<none>"
        if self.shard is not None:
            return f"{name}[{self.shard}]"
        return f"{name}[member]" if self.member else name


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_microtime(value)
    except ValueError:
        return None


def _format_time(moment: datetime | None) -> str | None:
    return format_microtime(moment) if moment else None


def human_duration(seconds: float) -> str:
    """kubectl's short ages: 45s, 3m20s, 25m, 5h12m, 30h, 3d4h, 12d, 3y."""
    if seconds < -1:
        return "<future>"  # a clock ahead of ours; another reason EXPIRED is only a hint
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    return f"{d // 365}y"


class Table:
    """kubectl-style columns; later rows (in --watch) reuse the widths of the first print."""

    def __init__(self, all_namespaces: bool) -> None:
        self.columns = ["ELECTION", "HOLDER", "LAST RENEW", "TRANSITIONS", "EXPIRED", "LEASE"]
        if all_namespaces:
            self.columns.insert(0, "NAMESPACE")
        self._all = all_namespaces
        self._widths: list[int] = []

    def cells(self, row: Election, now: datetime) -> list[str]:
        expired = row.looks_expired(now)
        renew = human_duration((now - row.renew_time).total_seconds()) if row.renew_time else None
        cells = [
            row.title,
            row.holder or "<none>",
            renew or "<unknown>",
            str(row.transitions) if row.transitions is not None else "<unknown>",
            "deleted" if row.deleted else {True: "yes", False: "no", None: "-"}[expired],
            row.lease,
        ]
        if self._all:
            cells.insert(0, row.namespace)
        return cells

    def lines(self, rows: list[Election], now: datetime, header: bool) -> list[str]:
        grid = [self.cells(row, now) for row in rows]
        if header:
            grid.insert(0, self.columns)
        if not self._widths:
            self._widths = [
                max(len(r[i]) for r in [self.columns, *grid]) for i in range(len(self.columns))
            ]
        out = []
        for cells in grid:
            padded = [c.ljust(w) for c, w in zip(cells[:-1], self._widths, strict=False)]
            out.append("   ".join([*padded, cells[-1]]).rstrip())
        return out


# ------------------------------------------------------------------ the command


async def _status(args: argparse.Namespace, kubeconfig: str | None) -> int:
    from sidecar.backends.kubeclient import KubeApi, k8s

    api = KubeApi(kubeconfig, context=args.context)
    try:
        connection = await api.connect()
    except (k8s().ConfigException, OSError, ValueError, KeyError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster"
        raise StatusError(f"cannot load Kubernetes credentials ({where}): {exc}") from None
    namespace = (
        None if args.all_namespaces else (args.namespace or connection.namespace or "default")
    )
    lister = _Lister(api, namespace)
    try:
        rows, version = await lister.list()
        now = datetime.now(UTC)
        table = Table(all_namespaces=namespace is None)
        if args.output == "json":
            if args.watch:
                for row in rows:
                    _print_json({"type": "ADDED", **row.to_dict(now)})
            else:
                items = [row.to_dict(now) for row in rows]
                _print(json.dumps({"items": items, "note": EXPIRED_NOTE}, indent=2))
        elif rows:
            for line in table.lines(rows, now, header=True):
                _print(line)
            if any(row.looks_expired(now) for row in rows):
                print(EXPIRED_NOTE, file=sys.stderr)
        elif not args.watch:
            where = "any namespace" if namespace is None else f"namespace {namespace!r}"
            print(f"No leader-sidecar elections found in {where}.", file=sys.stderr)
        if args.watch:
            await _watch(lister, rows, version, table, args.output)
        return EXIT_OK
    finally:
        await api.close()


def _print(line: str) -> None:
    print(line, flush=True)


def _print_json(obj: dict[str, Any]) -> None:
    _print(json.dumps(obj))


class _Lister:
    def __init__(self, api: KubeApi, namespace: str | None) -> None:
        self._api = api
        self.namespace = namespace
        base = "/apis/coordination.k8s.io/v1"
        self.path = f"{base}/namespaces/{namespace}/leases" if namespace else f"{base}/leases"

    async def list(self) -> tuple[list[Election], str]:
        body = await self._call(
            self._api.request(
                "GET", self.path, timeout=REQUEST_TIMEOUT, query={"labelSelector": MANAGED_SELECTOR}
            ),
            "list",
        )
        rows = [Election.from_lease(item) for item in body.get("items") or []]
        rows.sort(key=lambda row: (row.namespace, row.election, row.lease))
        return rows, str((body.get("metadata") or {}).get("resourceVersion", ""))

    async def watch(self, version: str) -> AsyncIterator[dict[str, Any]]:
        query = {
            "watch": "true",
            "labelSelector": MANAGED_SELECTOR,
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        from sidecar.backends.kubeclient import ApiError, Unreachable
        from sidecar.backends.kubernetes import WATCH_IDLE_SECONDS

        try:
            async for event in self._api.stream(
                self.path, query, timeout=REQUEST_TIMEOUT, idle_timeout=WATCH_IDLE_SECONDS
            ):
                yield event
        except ApiError as exc:
            raise StatusError(self._explain(exc, "watch")) from None
        except Unreachable as exc:
            raise StatusError(str(exc)) from None

    async def _call(self, call: Any, verb: str) -> Any:
        from sidecar.backends.kubeclient import ApiError, Unreachable

        try:
            return await call
        except ApiError as exc:
            raise StatusError(self._explain(exc, verb)) from None
        except Unreachable as exc:
            raise StatusError(str(exc)) from None

    def _explain(self, exc: Any, verb: str) -> str:
        where = "cluster-wide" if self.namespace is None else f"in namespace {self.namespace!r}"
        if exc.status in (401, 403):
            resource = "leases.coordination.k8s.io"
            return explain_api_error(exc.status, exc.message, verb, resource, where)
        return f"the API server answered {exc}"


async def _watch(
    lister: _Lister, rows: list[Election], version: str, table: Table, output: str
) -> None:
    """Follow the Leases until interrupted; relist when the server ends the watch."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    known = {row.key: row for row in rows}
    shown = {row.key: row.facts(datetime.now(UTC)) for row in rows}

    def show(row: Election, kind: str) -> None:
        now = datetime.now(UTC)
        facts = row.facts(now)
        if shown.get(row.key) == facts:
            return
        shown[row.key] = facts
        if output == "json":
            _print_json({"type": kind, **row.to_dict(now)})
        else:
            for line in table.lines([row], now, header=not table._widths):
                _print(line)

    def apply(event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind in ("ADDED", "MODIFIED"):
            row = Election.from_lease(obj)
            known[row.key] = row
            show(row, str(kind))
        elif kind == "DELETED":
            row = Election.from_lease(obj, deleted=True)
            known.pop(row.key, None)
            show(row, "DELETED")
            shown.pop(row.key, None)

    while not stop.is_set():
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        reader = asyncio.create_task(_pump(lister.watch(version), queue))
        stopper = asyncio.create_task(stop.wait())
        try:
            while True:
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopper}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
                if stopper in done:
                    getter.cancel()
                    return
                if getter not in done:
                    getter.cancel()
                    for row in list(known.values()):  # expiry moves with the clock alone
                        show(row, "MODIFIED")
                    continue
                event = getter.result()
                if event is None:  # the watch ended (timeout or 410 Gone): relist
                    await reader  # raises what ended it, if it failed
                    break
                if event.get("type") == "BOOKMARK":
                    version = str(event["object"]["metadata"]["resourceVersion"])
                elif event.get("type") == "ERROR":
                    break
                else:
                    apply(event)
                    version = str(
                        (event.get("object") or {}).get("metadata", {}).get("resourceVersion")
                        or version
                    )
        finally:
            stopper.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        rows, version = await lister.list()
        current = {row.key: row for row in rows}
        for key, row in list(known.items()):
            if key not in current:
                apply({"type": "DELETED", "object": _as_lease(row)})
        for row in rows:
            kind = "MODIFIED" if row.key in known else "ADDED"
            known[row.key] = row
            show(row, kind)


async def _pump(
    events: AsyncIterator[dict[str, Any]], queue: asyncio.Queue[dict[str, Any] | None]
) -> None:
    try:
        async for event in events:
            queue.put_nowait(event)
    finally:
        queue.put_nowait(None)


def _as_lease(row: Election) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": row.namespace,
            "name": row.lease,
            "labels": {ELECTION_LABEL: row.election} if row.election else {},
        },
        "spec": {
            "holderIdentity": row.holder,
            "renewTime": _format_time(row.renew_time),
            "acquireTime": _format_time(row.acquire_time),
            "leaseDurationSeconds": row.duration_seconds,
            "leaseTransitions": row.transitions,
        },
    }
