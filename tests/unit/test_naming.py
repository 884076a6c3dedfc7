import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.naming import (
    default_identity,
    election_label_value,
    is_dns_subdomain,
    lease_labels,
    lease_name,
    workload_hash,
)


def test_lease_name_is_prefix_and_sixteen_hex_digits_of_sha256() -> None:
    digest = hashlib.sha256(b"checkout").hexdigest()
    assert lease_name("leader-sidecar", "checkout") == f"leader-sidecar-{digest[:16]}"


def test_lease_name_is_stable_and_separates_workloads() -> None:
    assert lease_name("p", "a") == lease_name("p", "a")
    assert lease_name("p", "a") != lease_name("p", "b")
    assert lease_name("p", "a") != lease_name("q", "a")


@given(st.text(min_size=1, max_size=400))
def test_any_workload_name_gives_a_valid_object_name(workload: str) -> None:
    name = lease_name("leader-sidecar", workload)
    assert is_dns_subdomain(name)
    assert len(workload_hash(workload)) == 16


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("a", True),
        ("leader-sidecar-0123", True),
        ("a.b-c", True),
        ("A", False),
        ("-a", False),
        ("a-", False),
        ("a_b", False),
        ("", False),
        ("a" * 253, True),
        ("a" * 254, False),
    ],
)
def test_dns_subdomain(name: str, valid: bool) -> None:
    assert is_dns_subdomain(name) is valid


def test_label_value_is_the_name_when_valid_and_a_hash_when_too_long() -> None:
    assert election_label_value("checkout") == "checkout"
    long = "x" * 64
    assert election_label_value(long) == "sha256-" + workload_hash(long)
    assert len(election_label_value("y" * 300)) <= 63
    assert election_label_value("has space") == "sha256-" + workload_hash("has space")


def test_labels_make_the_lease_findable() -> None:
    assert lease_labels("checkout") == {
        "app.kubernetes.io/managed-by": "leader-sidecar",
        "leader-sidecar.io/election": "checkout",
    }


def test_identity_prefers_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "web-7d9f-abcde")
    assert default_identity(in_kubernetes=False) == "web-7d9f-abcde"


def test_identity_outside_a_pod_is_unique_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POD_NAME", raising=False)
    import os
    import socket

    assert default_identity(in_kubernetes=True) == socket.gethostname()
    assert default_identity(in_kubernetes=False) == f"{socket.gethostname()}_{os.getpid()}"
