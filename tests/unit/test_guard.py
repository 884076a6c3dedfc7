"""The guard in front of the APIs: Host, Origin, token, stream slots."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.api.guard import ApiToken, Denied, Guard, StreamSlots


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "localhost:4040",
        "app.localhost:4040",
        "127.0.0.1:4040",
        "127.9.8.7",
        "[::1]:4040",
        "LOCALHOST:4040",
        None,
    ],
)
def test_loopback_hosts_pass(host: str | None) -> None:
    headers = {} if host is None else {"Host": host}
    Guard().check(headers, "GET", "/leader")


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:4040", "10.0.0.1:4040", "localhost.evil.example"]
)
def test_other_hosts_are_403(host: str) -> None:
    with pytest.raises(Denied) as denied:
        Guard().check({"Host": host}, "GET", "/leader")
    assert denied.value.status == 403


def test_configured_hosts_and_the_wildcard() -> None:
    Guard(["web-0.internal"]).check({"Host": "web-0.internal:4040"}, "GET", "/leader")
    Guard(["*"]).check({"Host": "anything:1"}, "POST", "/leader/resign")


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "file://", "http://10.0.0.1"])
def test_foreign_origins_may_not_write(origin: str) -> None:
    guard = Guard()
    guard.check({"Origin": origin}, "GET", "/leader")  # reads: the browser's CORS protects
    with pytest.raises(Denied) as denied:
        guard.check({"Origin": origin, "Host": "localhost"}, "POST", "/leader/resign")
    assert denied.value.status == 403


def test_token_guards_writes_and_by_flag_reads(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("abc\n")
    writes_only = Guard(token=ApiToken(tmp_path / "t"))
    writes_only.check({}, "GET", "/leader")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "abc"}):
        with pytest.raises(Denied) as denied:
            writes_only.check(headers, "POST", "/leader/resign")
        assert denied.value.status == 401
    writes_only.check({"Authorization": "Bearer abc"}, "POST", "/leader/resign")
    writes_only.check({"Authorization": "bearer abc"}, "POST", "/leader/resign")
    reads = Guard(token=ApiToken(tmp_path / "t"), token_for_reads=True)
    with pytest.raises(Denied):
        reads.check({}, "GET", "/leader")
    reads.check({}, "GET", "/healthz")  # probes never need it
    reads.check({}, "GET", "/readyz")


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("\n")
    with pytest.raises(ValueError):
        ApiToken(tmp_path / "t")


def test_stream_slots() -> None:
    slots = StreamSlots(2)
    assert slots.acquire() and slots.acquire() and not slots.acquire()
    slots.release()
    assert slots.acquire()
    assert "--max-streams" in slots.refusal()
