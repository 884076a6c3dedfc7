"""`--app-health-url`: only a healthy app may lead.

Until the app first answers 2xx the replica stays out of the race; after `threshold`
consecutive failures it leaves it (a leader resigns); one 2xx lets it back in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import structlog

OnChange = Callable[[bool, str], None]  # (eligible, "healthy" | "unhealthy" | "unknown")


class AppHealthMonitor:
    def __init__(self, url: str, period: float, threshold: int, on_change: OnChange) -> None:
        self._url = url
        self._period = period
        self._threshold = threshold
        self._on_change = on_change
        self._failures = 0
        self._state = "unknown"
        self._log: Any = structlog.get_logger("app-health").bind(url=url)

    @property
    def state(self) -> str:
        return self._state

    async def run(self) -> None:
        self._on_change(False, "unknown")
        timeout = aiohttp.ClientTimeout(total=self._period)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                ok, detail = await self._probe(session)
                self._record(ok, detail)
                await asyncio.sleep(max(0.0, self._period - (loop.time() - started)))

    async def _probe(self, session: aiohttp.ClientSession) -> tuple[bool, str]:
        try:
            async with session.get(self._url, allow_redirects=False) as response:
                await response.read()
                return 200 <= response.status < 300, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, str(exc) or type(exc).__name__

    def _record(self, ok: bool, detail: str) -> None:
        if ok:
            self._failures, new = 0, "healthy"
        else:
            self._failures += 1
            new = "unhealthy" if self._failures >= self._threshold else self._state
        if new != self._state:
            self._log.info("app health changed", state=new, detail=detail, failures=self._failures)
            self._state = new
            self._on_change(new == "healthy", new)
