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

from sidecar.api.http import HttpApi, metrics_app
from sidecar.config import ConfigError, Settings
from sidecar.election.elector import ElectionObserver, Elector, Timings
from sidecar.election.lock import LeaseLock
from sidecar.log import configure
from sidecar.metrics import Metrics
from sidecar.naming import election_label_value, lease_labels, lease_name
from sidecar.state import Broadcaster, Leadership, LeaseInfo, Role

if TYPE_CHECKING:
    from sidecar.api.grpc import GrpcApi
    from sidecar.backends.kubeclient import KubeApi
    from sidecar.events import LeaderEvents
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
        assert settings.local_dir is not None  # resolved by the CLI for the local backend
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


class _Observers(ElectionObserver):
    """Tells metrics and Kubernetes Events what the elector did; a failure is only logged."""

    def __init__(self, *observers: ElectionObserver) -> None:
        self._observers = observers
        self._log: Any = structlog.get_logger("app")

    def _each(self, call: Any) -> None:
        for observer in self._observers:
            try:
                call(observer)
            except Exception:
                self._log.exception("observer failed", observer=type(observer).__name__)

    def acquired(self, transitions: int) -> None:
        self._each(lambda o: o.acquired(transitions))

    def lost(self, reason: str) -> None:
        self._each(lambda o: o.lost(reason))

    def renewed(self, seconds: float) -> None:
        self._each(lambda o: o.renewed(seconds))

    def renew_failed(self, error: BaseException) -> None:
        self._each(lambda o: o.renew_failed(error))


async def _leader_events(
    settings: Settings, backend: _Backend, metrics: Metrics
) -> LeaderEvents | None:
    """Kubernetes Events on this Pod (--events), or None with the reason logged once."""
    if not settings.events:
        return None
    log: Any = structlog.get_logger("events")
    pod = os.environ.get("POD_NAME", "")
    if settings.backend != "kubernetes" or backend.api is None:
        log.warning("--events is on but ignored: Events need the kubernetes backend")
        return None
    if not pod:
        log.warning(
            "--events is on but ignored: POD_NAME is not set (the Downward API's "
            "metadata.name), so there is no Pod to record Events on"
        )
        return None
    from sidecar.backends.kubeclient import KubeApi
    from sidecar.events import LeaderEvents

    # A client of its own: the lock's is closed as soon as the Lease is released, while the
    # StoppedLeading Event may still be on its way.
    api = KubeApi(settings.kubeconfig, service_account_dir=settings.service_account_dir)
    try:
        await api.connect()
    except Exception as exc:
        log.warning("--events is on but ignored: cannot load credentials", error=str(exc))
        return None
    api.observer = metrics.api_request
    events = LeaderEvents(
        api,
        pod=pod,
        pod_namespace=backend.pod_namespace or backend.namespace,
        identity=settings.identity,
        lease_name=backend.lease_name,
        lease_namespace=backend.namespace,
        pod_uid=os.environ.get("POD_UID") or None,
        metrics=metrics,
        timeout=min(5.0, settings.renew_deadline),
    )
    events.start()
    return events


async def _main(settings: Settings) -> int:
    log: Any = structlog.get_logger("app")
    if settings.election:
        structlog.contextvars.bind_contextvars(election=settings.election)
    backend = await _open_backend(settings)
    lock, namespace, name = backend.lock, backend.namespace, backend.lease_name
    # Every log line from here on (tasks inherit the context) names the election and Lease.
    structlog.contextvars.bind_contextvars(election=backend.election, lease=lock.description)
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
    metrics = Metrics(broadcaster, election=backend.election, backend=settings.backend)
    if backend.api is not None:
        backend.api.observer = metrics.api_request
    events = await _leader_events(settings, backend, metrics)
    elector = Elector(
        lock,
        settings.identity,
        Timings(settings.lease_duration, settings.renew_deadline, settings.retry_period),
        broadcaster,
        lease_name=name,
        namespace=namespace,
        hooks=labeler,
        observer=_Observers(metrics, events) if events is not None else metrics,
    )
    control = _Control(elector)
    http_api = HttpApi(broadcaster, control, metrics)
    metrics.count_subscribers("sse", lambda: http_api.streams)
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
        grpc_streams = grpc_api
        metrics.count_subscribers("grpc", lambda: grpc_streams.streams)
    metrics_runner: web.AppRunner | None = None
    if settings.metrics_host is not None:
        metrics_runner = web.AppRunner(metrics_app(metrics), access_log=None)
        await metrics_runner.setup()
        try:
            await web.TCPSite(metrics_runner, settings.metrics_host, settings.metrics_port).start()
        except OSError as exc:
            await metrics_runner.cleanup()
            if grpc_api is not None:
                await grpc_api.stop()
            await runner.cleanup()
            await lock.close()
            raise ConfigError(
                f"--metrics-address {settings.metrics_host}:{settings.metrics_port}: cannot "
                f"listen: {exc.strerror or exc}"
            ) from None

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
        metrics=_listening(metrics_runner) if metrics_runner is not None else None,
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
    if events is not None:
        await events.close(timeout=1.0)  # StoppedLeading, if it is still on its way
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
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("stopped")
    return code


def _listening(runner: web.AppRunner) -> list[str]:
    addresses = []
    for address in runner.addresses:
        host, port = address[0], address[1]
        addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return addresses
