"""Wiring: backend -> elector -> broadcaster -> APIs; signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from sidecar.api.http import HttpApi
from sidecar.config import ConfigError, Settings
from sidecar.election.elector import Elector, Timings
from sidecar.election.lock import LeaseLock
from sidecar.log import configure
from sidecar.naming import election_label_value, lease_labels, lease_name
from sidecar.state import Broadcaster, Leadership, LeaseInfo, Role

if TYPE_CHECKING:
    from sidecar.api.grpc import GrpcApi
    from sidecar.backends.kubeclient import KubeApi
    from sidecar.integration.notify import Notifier
    from sidecar.integration.pod_label import PodLabeler

EXIT_OK, EXIT_FATAL, EXIT_CONFIG = 0, 1, 2


def run(settings: Settings) -> int:
    configure(settings.log_format, settings.log_level)
    try:
        return asyncio.run(_main(settings))
    except ConfigError as exc:
        print(f"leader-sidecar: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


class _Control:
    def __init__(self, elector: Elector) -> None:
        self.elector = elector
        self.task: asyncio.Task[None] | None = None

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def resign(self) -> bool:
        return await self.elector.resign()


@dataclass
class _Backend:
    lock: LeaseLock
    namespace: str
    lease_name: str
    election: str
    api: KubeApi | None = None  # the kubernetes backend's client, for the integrations
    pod_namespace: str | None = None


async def _open_backend(settings: Settings) -> _Backend:
    """The lock and where it lives; ConfigError for what a person must fix."""
    if settings.backend == "local":
        from sidecar.backends.local import LocalLeaseLock

        name = settings.lease_name or lease_name(settings.lease_prefix, settings.election or "")
        local = LocalLeaseLock(settings.local_dir, name)
        return _Backend(local, settings.namespace or "local", name, settings.election or name)

    from sidecar.backends.discovery import discover_workload
    from sidecar.backends.kubeclient import KubeApi, k8s
    from sidecar.backends.kubernetes import KubernetesLeaseLock

    api = KubeApi(settings.kubeconfig, service_account_dir=settings.service_account_dir)
    try:
        connection = await api.connect()
    except (k8s().ConfigException, OSError, ValueError, KeyError) as exc:
        where = f"--kubeconfig {settings.kubeconfig}" if settings.kubeconfig else "in-cluster"
        raise ConfigError(f"cannot load Kubernetes credentials ({where}): {exc}") from None
    namespace = settings.namespace or connection.namespace or "default"
    election = settings.election
    if not election and not settings.lease_name:
        election = await discover_workload(api, namespace, os.environ.get("POD_NAME", ""))
    name = settings.lease_name or lease_name(settings.lease_prefix, election or "")
    labels = lease_labels(election) if election else lease_labels(name)
    lock = KubernetesLeaseLock(
        api, namespace, name, labels, request_timeout=settings.renew_deadline
    )
    pod_namespace = os.environ.get("POD_NAMESPACE") or connection.namespace or namespace
    return _Backend(lock, namespace, name, election or name, api, pod_namespace)


async def _pod_labeler(settings: Settings, backend: _Backend) -> PodLabeler | None:
    if not settings.label_pod:
        return None
    from sidecar.integration.pod_label import PodLabeler

    assert backend.api is not None and backend.pod_namespace is not None  # checked by the CLI
    labeler = PodLabeler(
        backend.api,
        backend.pod_namespace,
        os.environ["POD_NAME"],
        election_label_value(backend.election),
        timeout=settings.renew_deadline / 2,
    )
    await labeler.start()
    return labeler


async def _main(settings: Settings) -> int:
    log: Any = structlog.get_logger("app")
    backend = await _open_backend(settings)
    lock, namespace, name = backend.lock, backend.namespace, backend.lease_name
    labeler = await _pod_labeler(settings, backend)
    broadcaster = Broadcaster(
        Leadership(
            identity=settings.identity,
            role=Role.UNKNOWN,
            leader="",
            lease=LeaseInfo(name=name, namespace=namespace),
            observed_at=datetime.now(UTC),
        )
    )
    elector = Elector(
        lock,
        settings.identity,
        Timings(settings.lease_duration, settings.renew_deadline, settings.retry_period),
        broadcaster,
        lease_name=name,
        namespace=namespace,
        hooks=labeler,
    )
    control = _Control(elector)
    http_api = HttpApi(broadcaster, control)
    # Open event streams are ended by http_api.close(); nothing else should hold shutdown up.
    runner = web.AppRunner(http_api.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_host, settings.http_port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await lock.close()
        raise ConfigError(
            f"--http-address {settings.http_host}:{settings.http_port}: cannot listen: "
            f"{exc.strerror or exc}"
        ) from None
    grpc_api: GrpcApi | None = None
    grpc_listening: str | None = None
    if settings.grpc_address != "off":
        # Imported here: `--grpc-address off` spares grpcio's start-up time and memory.
        from sidecar.api.grpc import GrpcAddressError, GrpcApi

        grpc_api = GrpcApi(broadcaster, control)
        try:
            grpc_listening = await grpc_api.start(settings.grpc_address)
        except GrpcAddressError as exc:
            await runner.cleanup()
            await lock.close()
            raise ConfigError(f"--grpc-address: {exc}") from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info(
        "started",
        backend=settings.backend,
        lease=lock.description,
        identity=settings.identity,
        http=_listening(runner),
        grpc=grpc_listening,
        lease_duration=settings.lease_duration,
        renew_deadline=settings.renew_deadline,
        retry_period=settings.retry_period,
    )
    helpers: list[asyncio.Task[None]] = []
    notifier: Notifier | None = None
    if settings.app_health_url:
        from sidecar.integration.app_health import AppHealthMonitor

        elector.set_eligible(False, "unknown")  # no campaign before the app first answers 2xx
        monitor = AppHealthMonitor(
            settings.app_health_url,
            settings.app_health_period,
            settings.app_health_failure_threshold,
            elector.set_eligible,
        )
        helpers.append(asyncio.create_task(monitor.run(), name="app-health"))
    if settings.notify_url:
        from sidecar.integration.notify import Notifier

        notifier = Notifier(settings.notify_url, broadcaster)
        helpers.append(asyncio.create_task(notifier.run(), name="notify"))
    control.task = asyncio.create_task(elector.run(), name="elector")
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({control.task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = EXIT_OK
    if control.task.done() and not control.task.cancelled() and control.task.exception():
        log.error("election loop crashed", exc_info=control.task.exception())
        code = EXIT_FATAL
    control.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await control.task
    stopper.cancel()
    log.info("stopping")
    await elector.shutdown(timeout=settings.shutdown_timeout)
    if notifier is not None:
        await notifier.flush(timeout=1.0)
    for helper in helpers:
        helper.cancel()
    await asyncio.gather(*helpers, return_exceptions=True)
    if labeler is not None:
        await labeler.close()
    if grpc_api is not None:
        # After the elector's shutdown: open streams have heard "not leader" by now.
        await grpc_api.stop()
    http_api.close()
    await runner.cleanup()
    log.info("stopped")
    return code


def _listening(runner: web.AppRunner) -> list[str]:
    addresses = []
    for address in runner.addresses:
        host, port = address[0], address[1]
        addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return addresses
