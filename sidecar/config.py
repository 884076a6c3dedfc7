"""Settings and their validation. Every error names the flag (and the env var it came from)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sidecar.naming import is_dns_label, is_dns_subdomain

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


# Exit codes of `leader-sidecar run` and `status` (the README's contract).
EXIT_OK = 0  # a clean shutdown
EXIT_FATAL = 1  # the election loop or a helper crashed; status: RBAC, connection
EXIT_CONFIG = 2  # bad configuration: flags, env, credentials, an address in use


class ConfigError(Exception):
    """Bad configuration: one line for stderr, exit code 2, nothing started."""


def parse_duration(text: str) -> float:
    """Go-style durations (`15s`, `500ms`, `1m30s`) or plain seconds (`2.5`), in seconds."""
    text = text.strip()
    if not text:
        raise ValueError("empty duration")
    try:
        return float(text)
    except ValueError:
        pass
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 15s, 500ms, 1m, or 2.5)")
    return total


def parse_address(text: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (loopback)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range: {port}")
    host = host.strip("[]") or "127.0.0.1"
    return host, port


def parse_grpc_address(text: str) -> str:
    """`host:port`, `[v6]:port`, `:port`, `unix:PATH` (gRPC's syntax), or `off` (no gRPC)."""
    text = text.strip()
    if text == "off":
        return text
    if text.startswith("unix:"):
        if not text.removeprefix("unix:").strip("/"):
            raise ValueError(f"no socket path in {text!r} (use e.g. unix:/run/leader.sock)")
        return text
    host, port = parse_address(text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("use true or false")


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def parse_http_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    return text.strip()


def default_local_dir() -> Path:
    """`/tmp/leader-sidecar-<uid>`: the same for every process of a user.

    Not `$TMPDIR` nor `$XDG_RUNTIME_DIR`: they differ between a user's shells, services and
    containers, and two replicas that resolve different directories silently run two elections.
    The local backend makes it 0700 and refuses it if another user owns it or can open it.
    """
    return Path("/tmp") / f"leader-sidecar-{os.geteuid()}"


@dataclass(frozen=True)
class Settings:
    backend: str  # "kubernetes" or "local" once resolved
    identity: str
    election: str | None  # the workload name; None: discover it from the pod
    lease_name: str | None  # None: derived from prefix + workload once known
    lease_prefix: str
    namespace: str | None
    kubeconfig: str | None
    lease_duration: float
    renew_deadline: float
    retry_period: float
    http_host: str
    http_port: int
    local_dir: Path | None  # None unless the backend is local
    log_format: str
    log_level: str
    shutdown_timeout: float
    service_account_dir: Path
    label_pod: bool = False
    rollout_aware: bool = False  # hand over to a ready replica of a newer Deployment revision
    app_health_url: str | None = None
    app_health_period: float = 5.0
    app_health_failure_threshold: int = 3
    notify_url: str | None = None
    grpc_address: str = "127.0.0.1:4041"  # host:port, unix:/path, or "off"
    events: bool = False  # Kubernetes Events on the Pod when leadership changes
    metrics_host: str | None = None  # --metrics-address: /metrics alone, e.g. for the pod network
    metrics_port: int = 0
    api_token_file: Path | None = None  # a shared secret for resign (and reads, by flag)
    api_token_reads: bool = False
    api_allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback
    max_streams: int = 1024  # open SSE + gRPC Watch streams
    shards: int | None = None  # --shards N: N shard elections instead of one leader


def check_timings(lease: float, renew: float, retry: float) -> None:
    if lease < 1 or lease != int(lease):
        raise ConfigError(
            f"--lease-duration must be a whole number of seconds, at least 1 (got {lease:g}s): "
            "the Lease stores whole seconds"
        )
    if retry <= 0:
        raise ConfigError(f"--retry-period must be positive (got {retry:g}s)")
    if not renew < lease:
        raise ConfigError(
            f"--renew-deadline ({renew:g}s) must be shorter than --lease-duration ({lease:g}s), "
            "or a leader could still act after others took over"
        )
    if not renew > retry * 1.2:
        raise ConfigError(
            f"--renew-deadline ({renew:g}s) must be longer than 1.2 x --retry-period "
            f"({retry:g}s), or one slow renewal loses leadership"
        )


def check_names(lease_name: str | None, prefix: str, namespace: str | None) -> None:
    if lease_name is not None and not is_dns_subdomain(lease_name):
        raise ConfigError(
            f"--lease-name {lease_name!r} is not a valid Kubernetes object name "
            "(lower-case letters, digits, '-' and '.', at most 253)"
        )
    if not is_dns_subdomain(f"{prefix}-0123456789abcdef"):
        raise ConfigError(
            f"--lease-prefix {prefix!r} does not make a valid Kubernetes object name "
            "(lower-case letters, digits and '-', at most 236)"
        )
    if namespace is not None and not is_dns_label(namespace):
        raise ConfigError(f"--namespace {namespace!r} is not a valid namespace name")
