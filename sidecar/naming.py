"""Lease names, labels and the replica's identity."""

from __future__ import annotations

import hashlib
import os
import re
import socket

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_SELECTOR = f"{MANAGED_BY}=leader-sidecar"  # finds every Lease the sidecar made
ELECTION_LABEL = "leader-sidecar.io/election"
SHARD_LABEL = "leader-sidecar.io/shard"  # --shards N: a shard Lease's index
MEMBER_LABEL = "leader-sidecar.io/member-of"  # --shards N: a replica's member Lease
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_LABEL_MAX = 63
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SUBDOMAIN_MAX = 253


def workload_hash(workload: str) -> str:
    """First 16 hex digits of SHA-256: the same in the sidecar, the chart and any script."""
    return hashlib.sha256(workload.encode()).hexdigest()[:16]


def lease_name(prefix: str, workload: str) -> str:
    return f"{prefix}-{workload_hash(workload)}"


def is_dns_subdomain(name: str) -> bool:
    """RFC 1123 subdomain, as the API server requires of object names."""
    if not 0 < len(name) <= _SUBDOMAIN_MAX:
        return False
    return all(_DNS_LABEL.match(part) for part in name.split("."))


def is_dns_label(name: str) -> bool:
    """RFC 1123 label, as the API server requires of namespace names."""
    return 0 < len(name) <= _DNS_LABEL_MAX and bool(_DNS_LABEL.match(name))


def election_label_value(workload: str) -> str:
    """The workload name as a label value, hashed when it is not a valid one (> 63 chars...)."""
    if len(workload) <= 63 and _LABEL_VALUE.match(workload):
        return workload
    return "sha256-" + workload_hash(workload)


def lease_labels(workload: str) -> dict[str, str]:
    return {MANAGED_BY: "leader-sidecar", ELECTION_LABEL: election_label_value(workload)}


def explain_api_error(status: int, message: str, verb: str, resource: str, where: str) -> str:
    """One wording for API errors a person must act on (RBAC, credentials)."""
    if status == 403:
        return f"RBAC denies '{verb}' on {resource} {where}: {message}"
    if status == 401:
        return f"the API server rejected our credentials (401): {message}"
    return f"the API server answered {status}: {message}"


def default_identity(in_kubernetes: bool) -> str:
    """POD_NAME, else the hostname (a pod's name in Kubernetes).

    Outside a pod several processes share a hostname, and two replicas with one identity would
    both believe they lead; so there the process id is appended.
    """
    pod = os.environ.get("POD_NAME", "").strip()
    if pod:
        return pod
    host = socket.gethostname()
    return host if in_kubernetes else f"{host}_{os.getpid()}"
