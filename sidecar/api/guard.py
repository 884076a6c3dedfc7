"""What every API request passes before it is served: loopback is not a boundary to browsers.

A page in any browser that can reach the port (a `kubectl port-forward`, the local backend on a
laptop) could otherwise post to `/leader/resign` cross-origin, and a DNS-rebinding page could
read the API under its own name. So, on HTTP:

- `Host` must be a loopback name or address (`localhost`, `*.localhost`, `127.0.0.0/8`, `::1`),
  the host of `--http-address`, or one of `--api-allowed-hosts`: else 403;
- a state-changing request (anything but GET/HEAD/OPTIONS) carrying an `Origin` must come from
  such a host too: else 403 (scripts send no `Origin`; a browser always does);
- with `--api-token-file`, resign needs `Authorization: Bearer <token>` (gRPC: the same in the
  `authorization` metadata), and with `--api-token-reads` the reads too: else 401 /
  UNAUTHENTICATED. Probes (`/healthz`, `/readyz`, gRPC health) and reflection never need it.

Open streams (SSE and gRPC Watch together) are capped: `StreamSlots`.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: never behind the token
TOKEN_RECHECK_SECONDS = 1.0
_HOST_CACHE_SIZE = 256


class Denied(Exception):
    """A request refused before it is served: the HTTP status and the reason, for the body."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ApiToken:
    """The shared secret of `--api-token-file`, re-read when the file changes (a mounted
    Secret is updated in place when it is rotated)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._token = b""
        self._load()
        if not self._token:
            raise ValueError(f"{path} is empty")

    def _load(self) -> None:
        stat = os.stat(self._path)
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp != self._stamp:
            token = self._path.read_bytes().strip()
            if token:  # a Secret being rewritten may be empty for a moment: keep the old one
                self._token = token
            self._stamp = stamp

    def matches(self, presented: str) -> bool:
        now = time.monotonic()
        if now - self._checked >= TOKEN_RECHECK_SECONDS:
            self._checked = now
            with contextlib.suppress(OSError):  # keep the token we have
                self._load()
        return hmac.compare_digest(presented.encode(), self._token)


class Guard:
    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        token: ApiToken | None = None,
        token_for_reads: bool = False,
    ) -> None:
        hosts = {host.strip().lower().strip("[]") for host in allowed_hosts if host.strip()}
        self._any_host = "*" in hosts
        self._hosts = frozenset(hosts - {"*"})
        self._token = token
        self._token_for_reads = token_for_reads
        self._host_ok: dict[str, bool] = {}

    @property
    def token_required_for_reads(self) -> bool:
        return self._token is not None and self._token_for_reads

    def check(self, headers: Mapping[str, str], method: str, path: str) -> None:
        """Raise `Denied` unless this HTTP request may be served."""
        host = headers.get("Host")
        if host is not None and not self._host_allowed(host):
            raise Denied(
                403,
                f"Host {host!r} is not a loopback name or address, nor in --api-allowed-hosts "
                "(refused against DNS rebinding)",
            )
        write = method not in SAFE_METHODS
        if write:
            origin = headers.get("Origin")
            if origin is not None and not self._origin_allowed(origin):
                raise Denied(403, f"cross-origin request from {origin!r} refused")
        if self._token is not None and (
            write or (self._token_for_reads and path not in OPEN_PATHS)
        ):
            reason = self.token_problem(headers.get("Authorization"))
            if reason is not None:
                raise Denied(401, reason)

    def token_problem(self, authorization: str | None, write: bool = True) -> str | None:
        """Why `authorization` (`Bearer <token>`) does not pass, or None if it does (or no
        token is needed for this kind of request)."""
        if self._token is None or not (write or self._token_for_reads):
            return None
        if not authorization:
            return "this request needs the API token (--api-token-file): Authorization: Bearer"
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not self._token.matches(value.strip()):
            return "wrong API token"
        return None

    def _host_allowed(self, host: str) -> bool:
        known = self._host_ok.get(host)
        if known is None:
            known = self._any_host or _is_allowed_name(_strip_port(host), self._hosts)
            if len(self._host_ok) >= _HOST_CACHE_SIZE:
                self._host_ok.clear()
            self._host_ok[host] = known
        return known

    def _origin_allowed(self, origin: str) -> bool:
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False  # includes the opaque origin "null"
        return self._any_host or _is_allowed_name(parts.hostname, self._hosts)


class StreamSlots:
    """The cap on open streams, SSE and gRPC Watch together (`--max-streams`; None: no cap)."""

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.open = 0
        self._lock = threading.Lock()  # the gRPC server runs on a thread of its own

    def acquire(self) -> bool:
        with self._lock:
            if self.cap is not None and self.open >= self.cap:
                return False
            self.open += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.open -= 1

    def refusal(self) -> str:
        return (
            f"too many open streams: all {self.cap} are in use (--max-streams); "
            "close one, poll GET /leader, or raise the cap"
        )


def _strip_port(host: str) -> str:
    host = host.strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def _is_allowed_name(name: str, configured: frozenset[str]) -> bool:
    name = name.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in configured:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
