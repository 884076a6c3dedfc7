"""`leader-sidecar run`: its flags and env vars -> Settings. Bad input exits 2 at once."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import (
    ConfigError,
    Settings,
    check_names,
    check_timings,
    default_local_dir,
    parse_address,
    parse_bool,
    parse_duration,
    parse_grpc_address,
    parse_http_url,
    parse_positive_int,
)
from sidecar.naming import default_identity, is_dns_subdomain

ENV_PREFIX = "LEADER_SIDECAR_"


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    metavar: str = ""
    default: str | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # the old contrib leader-elector's names, for drop-in use
    group: str = "election"
    boolean: bool = False  # a switch: `--flag`, or the env var set to true/false

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


MAX_SHARDS = 1024  # each shard is a Lease, a watch and a renewal per retry period

OPTIONS = (
    Option(
        "--election",
        "workload (e.g. Deployment) name the election is for; default: "
        "discovered from the pod's owners (kubernetes), 'default' (local)",
        "NAME",
    ),
    Option("--id", "this replica's identity; default: $POD_NAME, else the hostname", "ID"),
    Option(
        "--namespace",
        "namespace of the Lease; default: $POD_NAMESPACE, the service "
        "account's or kubeconfig's namespace, else 'default'",
        "NS",
        aliases=("--election-namespace",),
    ),
    Option(
        "--lease-name", "Lease name; default: <lease-prefix>-<16 hex of sha256(election)>", "NAME"
    ),
    Option("--lease-prefix", "prefix of the derived Lease name", "PREFIX", "leader-sidecar"),
    Option(
        "--shards",
        "own shards instead of electing one leader: N shard Leases (<lease-name>-<i>), "
        "spread over the live replicas, balanced within one (GET /shards)",
        "N",
    ),
    Option(
        "--lease-duration",
        "how long followers wait after the last renewal they saw before taking over",
        "DURATION",
        "15s",
        aliases=("--ttl",),
        group="timing",
    ),
    Option(
        "--renew-deadline",
        "the leader stops leading when it could not renew for this "
        "long; default: 2/3 of the lease duration",
        "DURATION",
        group="timing",
    ),
    Option(
        "--retry-period",
        "how often the leader renews; default: 1/5 of the renew deadline",
        "DURATION",
        group="timing",
    ),
    Option(
        "--backend",
        "where the Lease lives: auto picks kubernetes in a pod or with a kubeconfig, else local",
        default="auto",
        choices=("auto", "kubernetes", "local"),
        group="backend",
    ),
    Option(
        "--kubeconfig",
        "kubeconfig file (also $KUBECONFIG); default: in-cluster service account",
        "PATH",
        group="backend",
    ),
    Option(
        "--local-dir",
        "directory of the local backend's lease files, private to this user "
        "(default /tmp/leader-sidecar-<uid>, whatever TMPDIR says)",
        "DIR",
        group="backend",
    ),
    Option(
        "--service-account-dir",
        "where the in-cluster token, CA and namespace are",
        "DIR",
        "/var/run/secrets/kubernetes.io/serviceaccount",
        group="backend",
    ),
    Option(
        "--http-address",
        "HTTP API address (loopback: only the pod sees it)",
        "HOST:PORT",
        "127.0.0.1:4040",
        aliases=("--http",),
        group="serving",
    ),
    Option(
        "--grpc-address",
        "gRPC API address: HOST:PORT, unix:/PATH, or 'off'",
        "ADDRESS",
        "127.0.0.1:4041",
        group="serving",
    ),
    Option(
        "--shutdown-timeout",
        "on SIGTERM, the whole shutdown at most: 70%% for telling the app and releasing "
        "the Lease, then closing the servers; 15%% is left for the exit itself",
        "DURATION",
        "5s",
        group="serving",
    ),
    Option(
        "--api-token-file",
        "a shared token (e.g. a mounted Secret): resign then needs 'Authorization: Bearer "
        "<token>' on HTTP, 'authorization' metadata on gRPC; re-read when the file changes",
        "PATH",
        group="serving",
    ),
    Option(
        "--api-token-reads",
        "with --api-token-file: reads (/leader, /, /leader/self, /metrics, GetLeader, Watch) "
        "need the token too; probes (/healthz, /readyz, gRPC health) never do",
        group="serving",
        boolean=True,
    ),
    Option(
        "--api-allowed-hosts",
        "comma-separated Host names the HTTP API answers besides loopback ones (localhost, "
        "127.0.0.0/8, ::1) and --http-address's host; '*' turns the Host check off",
        "HOSTS",
        group="serving",
    ),
    Option(
        "--max-streams",
        "open event streams (SSE and gRPC Watch together) at most; more get 503 / "
        "RESOURCE_EXHAUSTED",
        "N",
        "1024",
        group="serving",
    ),
    Option(
        "--label-pod",
        "keep leader-sidecar.io/role=leader|follower on this Pod (POD_NAME, POD_NAMESPACE), "
        "set before the app hears it leads and reset before the Lease is released",
        group="integration",
        boolean=True,
    ),
    Option(
        "--rollout-aware",
        "during a rolling update of this Pod's Deployment, hand leadership to a ready replica of "
        "the newer revision (POD_NAME); needs 'get' on pods and replicasets, 'list' and 'watch' "
        "on pods",
        group="integration",
        boolean=True,
    ),
    Option(
        "--app-health-url",
        "campaign only while the app answers 2xx here; the leader resigns when it keeps failing",
        "URL",
        group="integration",
    ),
    Option(
        "--app-health-period",
        "how often to ask --app-health-url (also its timeout)",
        "DURATION",
        "5s",
        group="integration",
    ),
    Option(
        "--app-health-failure-threshold",
        "consecutive failures that make the app unhealthy",
        "N",
        "3",
        group="integration",
    ),
    Option(
        "--notify-url",
        "POST the /leader JSON here on every change (retried with backoff; newest state wins)",
        "URL",
        group="integration",
    ),
    Option(
        "--events",
        "record Kubernetes Events (BecameLeader, StoppedLeading) on this Pod (POD_NAME, "
        "POD_NAMESPACE); needs 'create' on events.events.k8s.io",
        group="operations",
        boolean=True,
    ),
    Option(
        "--metrics-address",
        "also serve GET /metrics alone here, e.g. 0.0.0.0:9102 for Prometheus on the pod "
        "network (the HTTP API serves /metrics on loopback anyway); 'off' for none",
        "HOST:PORT",
        "off",
        group="operations",
    ),
    Option(
        "--log-format",
        "auto: JSON unless stderr is a terminal",
        default="auto",
        choices=("auto", "json", "console"),
        group="logging",
    ),
    Option(
        "--log-level",
        "",
        default="info",
        choices=("debug", "info", "warning", "error"),
        group="logging",
    ),
)

GROUPS = {
    "election": "election",
    "timing": "timing (Go-style durations or seconds: 15s, 500ms, 1m, 2.5)",
    "backend": "backend",
    "serving": "serving",
    "integration": "app integration (all off by default)",
    "operations": "operations",
    "logging": "logging",
}


def _raw(args: argparse.Namespace, option: Option) -> tuple[str | None, str]:
    """The option's text and where it came from (for messages): flag, env var, or default."""
    value = getattr(args, option.dest)
    if value is not None:
        return value, option.flag
    env = os.environ.get(option.env)
    if env is not None and env != "":
        if option.choices and env not in option.choices:
            raise ConfigError(
                f"{option.env}={env!r} ({option.flag}): choose from {', '.join(option.choices)}"
            )
        return env, f"{option.env} ({option.flag})"
    return option.default, option.flag


def _convert(args: argparse.Namespace, option: Option, parse: Callable[[str], Any]) -> Any:
    text, source = _raw(args, option)
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigError(f"invalid {source} {text!r}: {exc}") from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    by_flag = {option.flag: option for option in OPTIONS}

    def text(flag: str) -> str | None:
        return _raw(args, by_flag[flag])[0]

    def duration(flag: str) -> float | None:
        return _convert(args, by_flag[flag], parse_duration)  # type: ignore[no-any-return]

    lease = duration("--lease-duration")
    assert lease is not None
    renew = duration("--renew-deadline")
    renew = renew if renew is not None else round(lease * 2 / 3, 3)
    retry = duration("--retry-period")
    retry = retry if retry is not None else round(renew / 5, 3)
    check_timings(lease, renew, retry)

    kubeconfig = text("--kubeconfig") or os.environ.get("KUBECONFIG") or None
    service_account_dir = Path(text("--service-account-dir") or "")
    backend = text("--backend") or "auto"
    if backend == "auto":
        from sidecar.backends.kubeclient import in_cluster

        backend = "kubernetes" if kubeconfig or in_cluster(service_account_dir) else "local"

    namespace = text("--namespace") or os.environ.get("POD_NAMESPACE") or None
    lease_name = text("--lease-name")
    prefix = text("--lease-prefix") or "leader-sidecar"
    check_names(lease_name, prefix, namespace)

    election = text("--election")
    if backend == "local" and not election and not lease_name:
        election = "default"
    identity = text("--id") or default_identity(
        in_kubernetes=backend == "kubernetes" and not kubeconfig
    )
    if not identity.strip():
        raise ConfigError("--id must not be empty")
    http_host, http_port = _convert(args, by_flag["--http-address"], parse_address)
    grpc_address = _convert(args, by_flag["--grpc-address"], parse_grpc_address)
    shutdown = duration("--shutdown-timeout")
    assert shutdown is not None
    label_pod = _convert(args, by_flag["--label-pod"], parse_bool) or False
    if label_pod and (backend != "kubernetes" or not os.environ.get("POD_NAME")):
        raise ConfigError(
            "--label-pod needs the kubernetes backend and POD_NAME (the Downward API's "
            "metadata.name) to know which Pod to label"
        )
    rollout_aware = _convert(args, by_flag["--rollout-aware"], parse_bool) or False
    if rollout_aware and (backend != "kubernetes" or not os.environ.get("POD_NAME")):
        raise ConfigError(
            "--rollout-aware needs the kubernetes backend and POD_NAME (the Downward API's "
            "metadata.name) to find this Pod's Deployment"
        )
    app_health_url = _convert(args, by_flag["--app-health-url"], parse_http_url)
    notify_url = _convert(args, by_flag["--notify-url"], parse_http_url)
    health_period = duration("--app-health-period")
    threshold = _convert(args, by_flag["--app-health-failure-threshold"], parse_positive_int)
    if health_period is None or health_period <= 0:
        raise ConfigError("--app-health-period must be positive")
    events = _convert(args, by_flag["--events"], parse_bool) or False
    metrics_address = text("--metrics-address") or "off"
    metrics_host, metrics_port = (
        (None, 0)
        if metrics_address == "off"
        else _convert(args, by_flag["--metrics-address"], parse_address)
    )
    token_file = text("--api-token-file")
    token_reads = _convert(args, by_flag["--api-token-reads"], parse_bool) or False
    if token_reads and not token_file:
        raise ConfigError("--api-token-reads needs --api-token-file")
    allowed_hosts = tuple(
        host.strip() for host in (text("--api-allowed-hosts") or "").split(",") if host.strip()
    )
    max_streams = _convert(args, by_flag["--max-streams"], parse_positive_int)
    shards = _convert(args, by_flag["--shards"], parse_positive_int)
    if shards is not None and shards > MAX_SHARDS:
        raise ConfigError(f"--shards must be at most {MAX_SHARDS} (got {shards})")
    if shards is not None:
        # Shard Leases are <name>-<i>, member Leases <name>-m-<16 hex>: both must be valid.
        longest = f"{lease_name or prefix + '-0123456789abcdef'}-m-0123456789abcdef"
        if not is_dns_subdomain(longest):
            raise ConfigError(
                "--shards: the Lease name is too long to derive the shard and member Lease "
                "names from it (at most 234 characters); use a shorter --lease-name or "
                "--lease-prefix"
            )
    return Settings(
        shards=shards,
        api_token_file=Path(token_file) if token_file else None,
        api_token_reads=token_reads,
        api_allowed_hosts=allowed_hosts,
        max_streams=max_streams,
        events=events,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        label_pod=label_pod,
        rollout_aware=rollout_aware,
        app_health_url=app_health_url,
        app_health_period=health_period,
        app_health_failure_threshold=threshold,
        notify_url=notify_url,
        backend=backend,
        identity=identity,
        election=election,
        lease_name=lease_name,
        lease_prefix=prefix,
        namespace=namespace,
        kubeconfig=kubeconfig,
        lease_duration=lease,
        renew_deadline=renew,
        retry_period=retry,
        http_host=http_host,
        http_port=http_port,
        # Resolved only for the local backend.
        local_dir=Path(text("--local-dir") or default_local_dir()) if backend == "local" else None,
        log_format=text("--log-format") or "auto",
        log_level=text("--log-level") or "info",
        shutdown_timeout=shutdown,
        service_account_dir=service_account_dir,
        grpc_address=grpc_address,
    )
