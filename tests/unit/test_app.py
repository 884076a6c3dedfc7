"""Supervision in `sidecar.app`: a helper or the election loop that dies stops the process
through the normal shutdown path (tell the app, release the Lease) with exit code 1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from sidecar import app
from sidecar.config import Settings
from sidecar.election.elector import Elector
from sidecar.integration.app_health import AppHealthMonitor


def settings(tmp_path: Path, **extra: Any) -> Settings:
    fields: dict[str, Any] = {
        "backend": "local",
        "identity": "me",
        "election": "supervised",
        "lease_name": None,
        "lease_prefix": "leader-sidecar",
        "namespace": None,
        "kubeconfig": None,
        "lease_duration": 3.0,
        "renew_deadline": 2.0,
        "retry_period": 0.2,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "local_dir": tmp_path,
        "log_format": "json",
        "log_level": "info",
        "shutdown_timeout": 2.0,
        "service_account_dir": tmp_path,
        "grpc_address": "127.0.0.1:0",
    }
    fields.update(extra)
    return Settings(**fields)


def events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [str(entry["event"]) for entry in logs]


async def led(logs: list[MutableMapping[str, Any]]) -> None:
    async with asyncio.timeout(10):
        while "acquired" not in events(logs):  # noqa: ASYNC110 (the log is a plain list)
            await asyncio.sleep(0.02)


async def test_a_helper_that_dies_releases_the_lease_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with structlog.testing.capture_logs() as logs:

        async def sick_monitor(self: AppHealthMonitor) -> None:
            self._on_change(True, "healthy")
            await led(logs)
            raise RuntimeError("the monitor has a bug")

        monkeypatch.setattr(AppHealthMonitor, "run", sick_monitor)
        code = await app._main(settings(tmp_path, app_health_url="http://127.0.0.1:9/healthz"))
    assert code == 1
    crashed = [e for e in logs if e["event"] == "app-health crashed"]
    assert crashed and crashed[0]["log_level"] == "error" and crashed[0]["exc_info"]
    # Released on the way out, after the crash.
    assert events(logs).index("released") > events(logs).index("app-health crashed")


async def test_a_crashed_election_loop_releases_the_lease_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feed: Callable[[Elector, Any], None] = Elector._feed

    def crashing(self: Elector, event: Any) -> None:
        feed(self, event)
        if self.is_leader:  # a bug while leading
            raise AssertionError("a bug in the election loop")

    monkeypatch.setattr(Elector, "_feed", crashing)
    with structlog.testing.capture_logs() as logs:
        code = await app._main(settings(tmp_path))
    assert code == 1
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["election loop crashed"]  # one structured line
    assert events(logs).index("released") > events(logs).index("election loop crashed")
