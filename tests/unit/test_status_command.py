"""`leader-sidecar status` without a cluster: rows, ages, the expired hint, and its flags.

Against the real API server: tests/e2e/test_operations.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sidecar.cli import build_parser, main, settings_from_args
from sidecar.cli.status import Election, Table, human_duration

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def lease(holder: str | None, renewed_ago: float | None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {
            "name": "leader-sidecar-0123456789abcdef",
            "namespace": "shop",
            "labels": {
                "app.kubernetes.io/managed-by": "leader-sidecar",
                "leader-sidecar.io/election": "checkout",
            },
        },
        "spec": {"leaseDurationSeconds": 15, "leaseTransitions": 4, **spec},
    }
    if holder is not None:
        body["spec"]["holderIdentity"] = holder
    if renewed_ago is not None:
        moment = NOW - timedelta(seconds=renewed_ago)
        body["spec"]["renewTime"] = moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return body


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59.9, "59s"),
        (119, "119s"),
        (125, "2m5s"),
        (600, "10m"),
        (3 * 3600 + 120, "3h2m"),
        (9 * 3600, "9h"),
        (3 * 86400 + 3600, "3d1h"),
        (40 * 86400, "40d"),
        (800 * 86400, "2y"),
        (-0.5, "0s"),
        (-30, "<future>"),
    ],
)
def test_ages_read_like_kubectl(seconds: float, text: str) -> None:
    assert human_duration(seconds) == text


def test_a_row_from_a_lease() -> None:
    row = Election.from_lease(lease("pod-a", 3))
    assert (row.namespace, row.election, row.holder, row.transitions) == (
        "shop",
        "checkout",
        "pod-a",
        4,
    )
    assert row.looks_expired(NOW) is False
    data = row.to_dict(NOW)
    assert data["last_renew_seconds_ago"] == 3
    assert data["renew_time"].endswith("Z")
    assert data["looks_expired"] is False


def test_expired_is_a_hint_from_this_machines_clock() -> None:
    assert Election.from_lease(lease("pod-a", 16)).looks_expired(NOW) is True
    assert Election.from_lease(lease("pod-a", 14)).looks_expired(NOW) is False
    # Released (no holder) or never renewed: nothing to expire.
    assert Election.from_lease(lease("", 100)).looks_expired(NOW) is None
    assert Election.from_lease(lease("pod-a", None)).looks_expired(NOW) is None


def test_the_table_looks_like_kubectl_get() -> None:
    rows = [
        Election.from_lease(lease("pod-a", 3)),
        Election.from_lease(lease("", 20, leaseTransitions=7)),
    ]
    lines = Table(all_namespaces=False).lines(rows, NOW, header=True)
    assert lines == [
        "ELECTION   HOLDER   LAST RENEW   TRANSITIONS   EXPIRED   LEASE",
        "checkout   pod-a    3s           4             no        leader-sidecar-0123456789abcdef",
        "checkout   <none>   20s          7             -         leader-sidecar-0123456789abcdef",
    ]
    wide = Table(all_namespaces=True).lines(rows[:1], NOW, header=True)
    assert wide[0].split()[:2] == ["NAMESPACE", "ELECTION"]
    assert wide[1].split()[0] == "shop"


def test_a_lease_without_the_election_label_still_shows() -> None:
    body = lease("pod-a", 1)
    del body["metadata"]["labels"]["leader-sidecar.io/election"]
    (line,) = Table(all_namespaces=False).lines([Election.from_lease(body)], NOW, header=False)
    assert line.split()[:2] == ["<none>", "pod-a"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["status", "-n", "a", "-A"], "not allowed with argument"),
        (["status", "-o", "yaml"], "invalid choice: 'yaml'"),
        (["status", "--watch", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_bad_status_flags_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_status_without_credentials_says_how_to_give_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "leader-sidecar status: error: no cluster credentials: pass --kubeconfig, set "
        "KUBECONFIG, or run in a pod\n"
    )


def test_run_takes_events_and_a_metrics_address(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LEADER_SIDECAR_EVENTS", "LEADER_SIDECAR_METRICS_ADDRESS", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    parse = build_parser().parse_args
    settings = settings_from_args(parse(["run", "--backend", "local"]))
    assert (settings.events, settings.metrics_host) == (False, None)
    settings = settings_from_args(
        parse(["run", "--backend", "local", "--events", "--metrics-address", ":9102"])
    )
    assert (settings.events, settings.metrics_host, settings.metrics_port) == (
        True,
        "127.0.0.1",
        9102,
    )
    monkeypatch.setenv("LEADER_SIDECAR_EVENTS", "true")
    monkeypatch.setenv("LEADER_SIDECAR_METRICS_ADDRESS", "0.0.0.0:9102")
    settings = settings_from_args(parse(["run", "--backend", "local"]))
    assert (settings.events, settings.metrics_host) == (True, "0.0.0.0")


def test_a_bad_metrics_address_names_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert main(["run", "--backend", "local", "--metrics-address", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leader-sidecar: error: invalid --metrics-address 'nowhere'")
    assert err.count("\n") == 1


def test_shard_and_member_leases_are_shown_as_such() -> None:
    from sidecar.cli.status import Election

    def lease(labels: dict[str, str]) -> dict[str, object]:
        return {
            "metadata": {"namespace": "ns", "name": "l", "labels": labels},
            "spec": {"holderIdentity": "pod-a"},
        }

    base = {"leader-sidecar.io/election": "shop"}
    assert Election.from_lease(lease(base)).title == "shop"
    shard = Election.from_lease(lease({**base, "leader-sidecar.io/shard": "3"}))
    assert (shard.title, shard.shard) == ("shop[3]", 3)
    member = Election.from_lease(lease({**base, "leader-sidecar.io/member-of": "l"}))
    assert (member.title, member.member) == ("shop[member]", True)
