import subprocess
import sys

import pytest

from sidecar.cli import build_parser, main, settings_from_args
from sidecar.config import ConfigError, Settings, parse_address, parse_duration


def settings(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["run", *argv]))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("LEADER_SIDECAR_") or name in ("POD_NAME", "POD_NAMESPACE"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15s", 15),
        ("500ms", 0.5),
        ("1m", 60),
        ("1m30s", 90),
        ("2.5", 2.5),
        ("1h", 3600),
        ("1.5s", 1.5),
        ("250us", 0.00025),
        ("0", 0),
    ],
)
def test_durations_take_go_units_or_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "15x", "1m 30s", "-", "ms500", "1.2.3s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_addresses() -> None:
    assert parse_address("127.0.0.1:4040") == ("127.0.0.1", 4040)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address(":9") == ("127.0.0.1", 9)
    for bad in ("4040", "host:", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_defaults_are_client_go_timings_on_the_local_backend() -> None:
    s = settings()
    assert (s.lease_duration, s.renew_deadline, s.retry_period) == (15, 10, 2)
    assert s.backend == "local"
    assert s.election == "default"
    assert (s.http_host, s.http_port) == ("127.0.0.1", 4040)


def test_a_shorter_lease_scales_the_other_timings() -> None:
    s = settings("--lease-duration", "3s")
    assert (s.lease_duration, s.renew_deadline, s.retry_period) == (3, 2, 0.4)


def test_contrib_leader_elector_flags_are_aliases() -> None:
    s = settings(
        "--election",
        "e",
        "--election-namespace",
        "ns",
        "--http",
        "0.0.0.0:8080",
        "--id",
        "me",
        "--ttl",
        "6s",
    )
    assert (s.election, s.namespace, s.http_host, s.http_port, s.identity) == (
        "e",
        "ns",
        "0.0.0.0",
        8080,
        "me",
    )
    assert s.lease_duration == 6


def test_env_vars_set_flags_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADER_SIDECAR_LEASE_DURATION", "30s")
    monkeypatch.setenv("LEADER_SIDECAR_ID", "from-env")
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    s = settings()
    assert (s.lease_duration, s.identity, s.namespace) == (30, "from-env", "team-a")
    assert settings("--id", "from-flag").identity == "from-flag"


def test_kubeconfig_selects_the_kubernetes_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings("--kubeconfig", "/nowhere").backend == "kubernetes"
    monkeypatch.setenv("KUBECONFIG", "/nowhere")
    assert settings().backend == "kubernetes"
    assert settings("--backend", "local").backend == "local"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lease-duration", "abc"], "--lease-duration"),
        (["--lease-duration", "2.5s"], "--lease-duration"),
        (["--renew-deadline", "20s"], "--renew-deadline"),
        (["--renew-deadline", "2s", "--retry-period", "2s"], "--renew-deadline"),
        (["--retry-period", "0"], "--retry-period"),
        (["--http-address", "nope"], "--http-address"),
        (["--lease-name", "Bad_Name"], "--lease-name"),
        (["--lease-prefix", "UPPER"], "--lease-prefix"),
        (["--namespace", "no/slash"], "--namespace"),
        (["--id", " "], "--id"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        settings(*argv)


def test_bad_env_values_name_the_env_var_and_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADER_SIDECAR_RETRY_PERIOD", "soon")
    with pytest.raises(ConfigError, match=r"LEADER_SIDECAR_RETRY_PERIOD \(--retry-period\)"):
        settings()
    monkeypatch.delenv("LEADER_SIDECAR_RETRY_PERIOD")
    monkeypatch.setenv("LEADER_SIDECAR_BACKEND", "etcd")
    with pytest.raises(ConfigError, match="LEADER_SIDECAR_BACKEND"):
        settings()


def test_main_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--lease-duration", "5s", "--renew-deadline", "9s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--renew-deadline" in err


@pytest.mark.parametrize(
    "argv",
    [["run", "--no-such-flag"], ["run", "--backend", "zookeeper"], ["frobnicate"], []],
)
def test_the_command_line_itself_exits_2_with_one_line(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", *argv], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_help_lists_every_flag_with_its_env_var() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    for flag in ("--election", "--lease-duration", "--http-address", "--local-dir"):
        assert flag in result.stdout
    assert "LEADER_SIDECAR_LEASE_DURATION" in result.stdout
