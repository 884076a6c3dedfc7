"""`--notify-url`: POST the /leader JSON to the app on every change.

Runs beside the elector as one more subscriber, so a slow or failing receiver never delays
anything else. Each state is retried with backoff and a timeout; when a newer state arrives
meanwhile, the older one is dropped: the receiver always ends with the newest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import aiohttp
import structlog

from sidecar.state import Broadcaster, Leadership

ATTEMPTS = 6
FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0


class Notifier:
    def __init__(self, url: str, broadcaster: Broadcaster, timeout: float = 5.0) -> None:
        self._url = url
        self._broadcaster = broadcaster
        self._timeout = timeout
        self._log: Any = structlog.get_logger("notify").bind(url=url)
        self._done_revision = -1  # the newest revision delivered or given up on
        self._progress = asyncio.Event()

    async def flush(self, timeout: float) -> None:
        """At shutdown: wait (a little) until the current state was delivered."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._done_revision < self._broadcaster.current.revision:
                    self._progress.clear()
                    await self._progress.wait()

    async def run(self) -> None:
        updates = self._broadcaster.subscribe()
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            pending: Leadership | None = await anext(updates)
            newer = asyncio.ensure_future(anext(updates))
            try:
                while True:
                    if pending is not None:
                        pending = await self._deliver(session, pending, newer)
                    if pending is None:
                        pending = await newer
                        newer = asyncio.ensure_future(anext(updates))
                    elif newer.done():
                        pending = newer.result()
                        newer = asyncio.ensure_future(anext(updates))
            finally:
                newer.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await newer
                await updates.aclose()

    async def _deliver(
        self, session: aiohttp.ClientSession, snapshot: Leadership, newer: asyncio.Future[Any]
    ) -> Leadership | None:
        """POST `snapshot` until it lands, gives up, or a newer state supersedes it.

        Returns the snapshot still to send (superseded: the caller takes the newer one), or
        None when done with it.
        """
        backoff = FIRST_BACKOFF
        for attempt in range(1, ATTEMPTS + 1):
            error = await self._post(session, snapshot)
            if error is None:
                self._finished(snapshot)
                return None
            self._log.warning("notify failed", attempt=attempt, error=error)
            pause = asyncio.ensure_future(asyncio.sleep(backoff * (1 + random.random() / 2)))
            await asyncio.wait({pause, newer}, return_when=asyncio.FIRST_COMPLETED)
            pause.cancel()
            if newer.done():
                return snapshot  # superseded
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
