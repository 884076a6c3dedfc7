"""`--notify-url`: POST the /leader JSON to the app on every change.

Runs beside the elector as one more subscriber, so a slow or failing receiver never delays
anything else. Each state is retried with backoff and a timeout; when a newer state arrives
meanwhile, the older one is dropped: the receiver always ends with the newest state. A state
counts as delivered only once its POST answered 2xx.

Only changes of facts are posted (a new `revision`), not the leader's fresh `valid_until`
after each renewal; when `valid_until` passes without a renewal, the "not leader" state that
follows is a change and is posted.

When this replica stops leading on purpose (SIGTERM, resign, the app turned unhealthy),
`flush()` runs as a step-down hook: the Lease is released only after the "not leader" POST
succeeded, or `FINAL_POST_SECONDS` passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import aiohttp
import structlog

from sidecar.leadership import Broadcaster, Leadership

ATTEMPTS = 6
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0
# How long a voluntary step-down waits for the "not leader" POST before releasing the Lease.
FINAL_POST_SECONDS = 1.0


class Notifier:
    def __init__(self, url: str, broadcaster: Broadcaster, timeout: float = 5.0) -> None:
        self._url = url
        self._broadcaster = broadcaster
        self._timeout = timeout
        self._log: Any = structlog.get_logger("notify").bind(url=url)
        self._done_revision = -1  # the newest revision delivered or given up on
        self._progress = asyncio.Event()
        self._newer: asyncio.Future[Leadership] | None = None

    async def flush(self, timeout: float = FINAL_POST_SECONDS) -> bool:
        """Wait (at most `timeout`) until the current state was delivered, or given up on."""
        try:
            async with asyncio.timeout(timeout):
                while self._done_revision < self._broadcaster.current.revision:
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        updates = self._broadcaster.subscribe()
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                pending: Leadership | None = await anext(updates)
                self._newer = asyncio.ensure_future(anext(updates))
                while True:
                    if pending is not None and pending.revision > self._done_revision:
                        pending = await self._deliver(session, pending, updates)
                        continue
                    pending = await self._newer
                    self._newer = asyncio.ensure_future(anext(updates))
        finally:
            if self._newer is not None:
                self._newer.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await self._newer
            await updates.aclose()

    async def _superseded(self, snapshot: Leadership, updates: Any) -> Leadership | None:
        """A newer state (a new revision) that arrived meanwhile, if any."""
        assert self._newer is not None
        while self._newer.done():
            newer = self._newer.result()
            self._newer = asyncio.ensure_future(anext(updates))
            if newer.revision > snapshot.revision:
                return newer
        return None

    async def _deliver(
        self, session: aiohttp.ClientSession, snapshot: Leadership, updates: Any
    ) -> Leadership | None:
        """POST `snapshot` until it lands, gives up, or a newer state supersedes it.

        Returns the newer state still to send, or None when done with this one.
        """
        backoff = FIRST_BACKOFF
        for attempt in range(1, ATTEMPTS + 1):
            error = await self._post(session, snapshot)
            if error is None:
                self._finished(snapshot)
                return None
            self._log.warning("notify failed", attempt=attempt, error=error)
            deadline = time.monotonic() + backoff * (1 + random.random() / 2)
            while (left := deadline - time.monotonic()) > 0:
                assert self._newer is not None
                await asyncio.wait({self._newer}, timeout=left)
                newer = await self._superseded(snapshot, updates)
                if newer is not None:
                    return newer
            backoff = min(backoff * 2, MAX_BACKOFF)
        self._log.error("notify gave up", attempts=ATTEMPTS, revision=snapshot.revision)
        self._finished(snapshot)
        return None

    def _finished(self, snapshot: Leadership) -> None:
        self._done_revision = max(self._done_revision, snapshot.revision)
        self._progress.set()

    async def _post(self, session: aiohttp.ClientSession, snapshot: Leadership) -> str | None:
        try:
            async with session.post(
                self._url,
                data=snapshot.as_of(time.monotonic()).to_json(),
                headers={
                    "Content-Type": "application/json",
                    "X-Leader-Sidecar-Revision": str(snapshot.revision),
                },
            ) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return str(exc) or type(exc).__name__
