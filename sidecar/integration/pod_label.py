"""`--label-pod`: keep `leader-sidecar.io/role` on this Pod in step with leadership.

A Service selecting `leader-sidecar.io/role=leader` then routes to the leader only, while the
standbys stay Ready (so rollouts never stall). The label turns `leader` before the app hears it
leads and `follower` before the Lease is released; a label that could not be written is
retried in the background until it is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from sidecar.backends.kubeclient import ApiError, KubeApi, Unreachable
from sidecar.naming import ELECTION_LABEL, explain_api_error

ROLE_LABEL = "leader-sidecar.io/role"
RETRY_SECONDS = 1.0


class PodLabeler:
    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        pod: str,
        election: str,
        timeout: float,
        on_crash: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self._on_crash = on_crash
        self._api = api
        self._namespace = namespace
        self._pod = pod
        self._election = election
        self._timeout = timeout
        self._desired = "follower"
        self._applied: str | None = None
        self._retry: asyncio.Task[None] | None = None
        self._log: Any = structlog.get_logger("pod-label").bind(pod=pod)

    async def start(self) -> None:
        """Label this Pod a follower: corrects a `leader` left by a crashed predecessor."""
        await self._set("follower")

    async def becoming_leader(self) -> None:
        await self._demote_stale_leaders()
        await self._set("leader")

    async def stepping_down(self) -> None:
        await self._set("follower")

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry

    async def _set(self, role: str) -> None:
        self._desired = role
        if not await self._apply():
            self._retry_later()

    async def _apply(self) -> bool:
        role = self._desired
        try:
            await self._patch(self._pod, role)
        except (ApiError, Unreachable) as exc:
            self._log.warning("pod label failed", role=role, error=_explain(exc, "patch"))
            return False
        if self._applied != role:
            self._log.info("pod labelled", role=role)
        self._applied = role
        return True

    def _retry_later(self) -> None:
        if self._retry is None or self._retry.done():
            self._retry = asyncio.create_task(self._retry_until_applied(), name="pod-label")
            self._retry.add_done_callback(self._retry_ended)

    def _retry_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        if self._on_crash is not None:
            self._on_crash("pod-label", task.exception())  # type: ignore[arg-type]

    async def _retry_until_applied(self) -> None:
        while True:
            await asyncio.sleep(RETRY_SECONDS)
            if await self._apply():
                return

    async def _patch(self, pod: str, role: str) -> None:
        labels = {ROLE_LABEL: role, ELECTION_LABEL: self._election}
        await self._api.request(
            "PATCH",
            f"/api/v1/namespaces/{self._namespace}/pods/{pod}",
            {"metadata": {"labels": labels}},
            timeout=self._timeout,
        )

    async def _demote_stale_leaders(self) -> None:
        """A leader killed without a goodbye leaves its Pod labelled `leader`: fix that first."""
        selector = f"{ROLE_LABEL}=leader,{ELECTION_LABEL}={self._election}"
        try:
            pods = await self._api.request(
                "GET",
                f"/api/v1/namespaces/{self._namespace}/pods",
                query={"labelSelector": selector},
                timeout=self._timeout,
            )
            for item in pods.get("items", []):
                name = item["metadata"]["name"]
                if name != self._pod:
                    await self._patch(name, "follower")
                    self._log.info("demoted stale leader label", stale_pod=name)
        except (ApiError, Unreachable) as exc:
            self._log.warning("stale leader labels not checked", error=_explain(exc, "list"))


def _explain(exc: ApiError | Unreachable, verb: str) -> str:
    if isinstance(exc, ApiError) and exc.status in (401, 403):
        return explain_api_error(exc.status, exc.message, verb, "pods", "on this Pod's namespace")
    return str(exc)
