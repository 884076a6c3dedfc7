"""Wiring: backend -> elector -> broadcaster -> APIs; signals, supervision, graceful shutdown.

Start-up and shutdown are one `AsyncExitStack`: each resource's tear-down is registered right
after it is set up, so a failure at any step (an address in use, SIGTERM during discovery)
closes exactly what was opened, in reverse order, through the same path as a normal stop.

Signal handlers are installed first, before anything that can block (discovery, the Pod label
PATCH, connecting for Events): SIGTERM as PID 1 is honoured at any moment.

Supervision: the election loop and every helper task (app health, notify, gRPC health, Pod
label retries, Events) are watched. One that dies is logged with its traceback, and the process
stops through the normal shutdown path (tell the app, release the Lease) and exits 1.

`--shutdown-timeout` (T) bounds the whole shutdown: telling the app, the step-down hooks (Pod
label, the final notify POST, at most `FINAL_POST_SECONDS`) and the release write get
`ELECTION_SHARE` of T; Events, closing the gRPC and HTTP servers share the rest, less
`EXIT_RESERVE` of T kept for the interpreter and gRPC's core to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from sidecar.api.guard import ApiToken, Guard, StreamSlots
from sidecar.api.http import HttpApi, metrics_app
from sidecar.config import EXIT_CONFIG, EXIT_FATAL, EXIT_OK, ConfigError, Settings
from sidecar.election.elector import ElectionObserver, Elector, Resignation, Timings
from sidecar.election.lock import LeaseLock
from sidecar.leadership import Broadcaster, Leadership, LeaseInfo, Role
from sidecar.log import configure
from sidecar.metrics import Metrics
from sidecar.naming import election_label_value, lease_labels, lease_name

if TYPE_CHECKING:
    from sidecar.backends.kubeclient import KubeApi
    from sidecar.events import LeaderEvents
    from sidecar.integration.notify import Notifier
    from sidecar.integration.pod_label import PodLabeler
    from sidecar.shards.runner import ShardRunner
    from sidecar.shards.snapshot import ShardsBroadcaster

ELECTION_SHARE = 0.7  # of --shutdown-timeout: tell the app, hooks, release
EXIT_RESERVE = 0.15  # of --shutdown-timeout: left for the process itself to exit
SERVERS_GRACE = 1.0  # at most, for calls in flight when the servers close


def run(settings: Settings) -> int:
    configure(settings.log_format, settings.log_level)
    try:
        return asyncio.run(_main(settings, own_process=True))
    except ConfigError as exc:
        print(f"leader-sidecar: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK


class _Stop:
    """Why and how the process stops: the first reason wins; a crash sets exit code 1."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.code = EXIT_OK
        self.reason = ""
        self._log: Any = structlog.get_logger("app")

    def signal(self, name: str) -> None:
        if not self.requested.is_set():
            self.reason = name
            self.requested.set()

    def crashed(self, what: str, exc: BaseException) -> None:
        self._log.error(f"{what} crashed", task=what, exc_info=exc)
        self.code = EXIT_FATAL
        if not self.requested.is_set():
            self.reason = f"{what} crashed"
            self.requested.set()

    def watch(self, task: asyncio.Task[Any], what: str) -> asyncio.Task[Any]:
        """Stop the process (exit 1) if `task` ends with an exception, or ends at all when it
        should run until cancelled."""

        def done(finished: asyncio.Task[Any]) -> None:
            if finished.cancelled():
                return
            exc = finished.exception()
            if exc is not None:
                self.crashed(what, exc)
            elif not self.requested.is_set():
                self.crashed(what, RuntimeError(f"{what} ended unexpectedly"))

        task.add_done_callback(done)
        return task


class _Budget:
    """The one deadline of the whole shutdown (--shutdown-timeout)."""

    def __init__(self, total: float) -> None:
        self.total = total
        self._deadline = time.monotonic() + total
        self._watchdog: threading.Timer | None = None

    def start(self, code: Callable[[], int] | None = None) -> None:
        """The shutdown begins. With `code`, a watchdog thread ends the process at the
        deadline with that exit code whatever still runs (the total is a promise)."""
        self._deadline = time.monotonic() + self.total
        if code is not None:
            self._watchdog = threading.Timer(self.total, _overdue, args=(code,))
            self._watchdog.daemon = True
            self._watchdog.start()

    def done(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def left(self, at_most: float | None = None) -> float:
        reserve = self.total * EXIT_RESERVE
        left = max(0.0, self._deadline - reserve - time.monotonic())
        return left if at_most is None else min(left, at_most)


def _overdue(code: Callable[[], int]) -> None:
    structlog.get_logger("app").error(
        "--shutdown-timeout passed before the shutdown finished: exiting now"
    )
    os._exit(code())


class _Control:
    def __init__(self, elector: Elector | ShardRunner) -> None:
        self.elector = elector
        self.task: asyncio.Task[None] | None = None

    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def resign(self) -> Resignation:
        return await self.elector.resign()


class _StepDownHooks:
    """What must happen in order with telling the app (the elector's LeadershipHooks):
    the Pod label before "leader" is published, and before the Lease is released both the
    label and the final "not leader" POST to --notify-url (at most FINAL_POST_SECONDS)."""

    def __init__(self, labeler: PodLabeler | None, notifier: Notifier | None) -> None:
        self._labeler = labeler
        self._notifier = notifier

    async def becoming_leader(self) -> None:
        if self._labeler is not None:
            await self._labeler.becoming_leader()

    async def stepping_down(self) -> None:
        steps: list[Awaitable[Any]] = []
        if self._labeler is not None:
            steps.append(self._labeler.stepping_down())
        if self._notifier is not None:
            steps.append(self._notifier.flush())
        await asyncio.gather(*steps)


@dataclass
class _Backend:
    lock: LeaseLock
    namespace: str
    lease_name: str
    election: str
    api: KubeApi | None = None  # the kubernetes backend's client, for the integrations
    pod_namespace: str | None = None


async def _open_backend(settings: Settings, stack: contextlib.AsyncExitStack) -> _Backend:
    """The lock and where it lives; ConfigError for what a person must fix."""
    if settings.backend == "local":
        from sidecar.backends.local import LocalLeaseLock

        name = settings.lease_name or lease_name(settings.lease_prefix, settings.election or "")
        assert settings.local_dir is not None  # resolved by the CLI for the local backend
        local = LocalLeaseLock(settings.local_dir, name)
        stack.push_async_callback(local.close)
        return _Backend(local, settings.namespace or "local", name, settings.election or name)

    from sidecar.backends.discovery import discover_workload
    from sidecar.backends.kubeclient import KubeApi, k8s
    from sidecar.backends.kubernetes import KubernetesLeaseLock

    api = KubeApi(settings.kubeconfig, service_account_dir=settings.service_account_dir)
    stack.push_async_callback(api.close)  # also the lock's: closing twice is harmless
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
        await api.close()
        return None
    api.observer = metrics.api_request
    return LeaderEvents(
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


def _guard(settings: Settings) -> Guard:
    token = None
    if settings.api_token_file is not None:
        try:
            token = ApiToken(settings.api_token_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--api-token-file: cannot use it: {exc}") from None
    hosts = list(settings.api_allowed_hosts)
    if settings.http_host not in ("", "0.0.0.0", "::"):
        hosts.append(settings.http_host)  # the address it listens on is its own name
    return Guard(hosts, token, token_for_reads=settings.api_token_reads)


async def _listen(
    stack: contextlib.AsyncExitStack,
    app: web.Application | web.Server,
    host: str,
    port: int,
    flag: str,
) -> web.BaseRunner:
    # Open event streams are ended by HttpApi.close(); nothing else should hold shutdown up.
    runner: web.BaseRunner
    if isinstance(app, web.Server):
        runner = web.ServerRunner(app, shutdown_timeout=SERVERS_GRACE)
    else:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SERVERS_GRACE)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        raise ConfigError(f"{flag} {host}:{port}: cannot listen: {exc.strerror or exc}") from None
    return runner


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _main(settings: Settings, own_process: bool = False) -> int:
    """Run until stopped; the exit code. `own_process`: the watchdog may end the process if
    the shutdown overruns --shutdown-timeout, even after this returns (interpreter exit)."""
    stop = _Stop()
    loop = asyncio.get_running_loop()
    # First of all: SIGTERM must work at any moment of the start-up too.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.signal, signal.Signals(signum).name)
    if settings.election:
        structlog.contextvars.bind_contextvars(election=settings.election)
    budget = _Budget(settings.shutdown_timeout)
    try:
        return await _run(settings, stop, budget)
    finally:
        if not own_process:
            budget.done()


async def _run(settings: Settings, stop: _Stop, budget: _Budget) -> int:
    log: Any = structlog.get_logger("app")
    async with contextlib.AsyncExitStack() as stack:
        starting = asyncio.create_task(_start(settings, stack, stop, budget), name="start")
        waiting = asyncio.create_task(stop.requested.wait())
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not starting.done():
            budget.start(lambda: stop.code)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            log.info("stopped during start-up", reason=stop.reason)
            return stop.code
        # A ConfigError propagates (exit 2) after the stack closed. The start-up task bound
        # the election and Lease to its log context; shutdown logs here name them too.
        structlog.contextvars.bind_contextvars(**starting.result())
        await stop.requested.wait()
        budget.start(lambda: stop.code)
        log.info("stopping", reason=stop.reason)
    log.info("stopped", code=stop.code)
    return stop.code


async def _start(
    settings: Settings, stack: contextlib.AsyncExitStack, stop: _Stop, budget: _Budget
) -> dict[str, Any]:
    """Open everything, registering each tear-down on `stack`, then run the election.
    Returns the log context it bound (election, Lease)."""
    log: Any = structlog.get_logger("app")
    guard = _guard(settings)
    backend = await _open_backend(settings, stack)
    lock, namespace, name = backend.lock, backend.namespace, backend.lease_name
    # Every log line from here on (tasks inherit the context) names the election and Lease.
    structlog.contextvars.bind_contextvars(election=backend.election, lease=lock.description)
    broadcaster = Broadcaster(
        Leadership(
            identity=settings.identity,
            role=Role.UNKNOWN,
            leader="",
            lease=LeaseInfo(name=name, namespace=namespace),
            observed_at=datetime.now(UTC),
        ),
        retry_period=settings.retry_period,
    )
    stack.callback(broadcaster.close)
    metrics = Metrics(broadcaster, election=backend.election, backend=settings.backend)
    if backend.api is not None:
        backend.api.observer = metrics.api_request

    labeler: PodLabeler | None = None
    if settings.label_pod:
        from sidecar.integration.pod_label import PodLabeler

        assert backend.api is not None and backend.pod_namespace is not None  # checked by CLI
        labeler = PodLabeler(
            backend.api,
            backend.pod_namespace,
            os.environ["POD_NAME"],
            election_label_value(backend.election),
            timeout=settings.renew_deadline / 2,
            on_crash=stop.crashed,
        )
        stack.push_async_callback(labeler.close)
        await labeler.start()

    events = await _leader_events(settings, backend, metrics)
    if events is not None:
        stack.push_async_callback(lambda: events.close(timeout=budget.left(1.0)))
        events.start()
        assert events.task is not None
        stop.watch(events.task, "kubernetes-events")

    notifier: Notifier | None = None
    if settings.notify_url:
        from sidecar.integration.notify import Notifier

        notifier = Notifier(settings.notify_url, broadcaster)

    hooks = _StepDownHooks(labeler, notifier) if labeler or notifier else None
    elector: Elector | ShardRunner
    shards: tuple[ShardsBroadcaster, ShardRunner] | None = None
    if settings.shards:
        from sidecar.shards.wiring import open_shards

        elector, shard_broadcaster = open_shards(
            settings, backend, broadcaster, hooks, metrics.registry
        )
        stack.callback(shard_broadcaster.close)
        shards = (shard_broadcaster, elector)
    else:
        elector = Elector(
            lock,
            settings.identity,
            Timings(settings.lease_duration, settings.renew_deadline, settings.retry_period),
            broadcaster,
            lease_name=name,
            namespace=namespace,
            hooks=hooks,
            observer=_Observers(metrics, events) if events is not None else metrics,
        )
    control = _Control(elector)
    slots = StreamSlots(settings.max_streams)

    http_api = HttpApi(broadcaster, control, metrics, guard, slots, shards=shards)
    metrics.count_subscribers("sse", lambda: http_api.streams)
    runner = await _listen(
        stack, http_api.server(), settings.http_host, settings.http_port, "--http-address"
    )
    stack.callback(http_api.close)  # before the runner's cleanup: end the event streams

    grpc_listening: str | None = None
    if settings.grpc_address != "off":
        # Imported here: `--grpc-address off` spares grpcio's start-up time and memory.
        from sidecar.api.grpc import GrpcAddressError
        from sidecar.api.grpc_thread import ThreadedGrpcApi

        # On its own thread and loop: fanning a change out to many streams must not delay
        # the elector or the HTTP API (see sidecar/api/grpc_thread.py).
        grpc_api = ThreadedGrpcApi(
            broadcaster, control, guard, slots, on_crash=stop.crashed, shards=shards
        )
        try:
            grpc_listening = await grpc_api.start(settings.grpc_address)
        except GrpcAddressError as exc:
            raise ConfigError(f"--grpc-address: {exc}") from None
        # After the elector's shutdown (below on the stack: runs earlier): open streams have
        # heard "not leader" by the time they are closed.
        stack.push_async_callback(lambda: grpc_api.stop(grace=budget.left(SERVERS_GRACE)))
        assert grpc_api.forwarder is not None
        stop.watch(grpc_api.forwarder, "grpc-forward")
        metrics.count_subscribers("grpc", lambda: grpc_api.streams)

    metrics_runner: web.BaseRunner | None = None
    if settings.metrics_host is not None:
        metrics_runner = await _listen(
            stack,
            metrics_app(metrics),
            settings.metrics_host,
            settings.metrics_port,
            "--metrics-address",
        )

    helpers: list[asyncio.Task[None]] = []
    stack.push_async_callback(_cancel, helpers)  # after the release: the final POST is done
    if settings.app_health_url:
        from sidecar.integration.app_health import AppHealthMonitor

        elector.set_eligible(False, "unknown")  # no campaign before the app first answers 2xx
        monitor = AppHealthMonitor(
            settings.app_health_url,
            settings.app_health_period,
            settings.app_health_failure_threshold,
            elector.set_eligible,
        )
        task = asyncio.create_task(monitor.run(), name="app-health")
        helpers.append(stop.watch(task, "app-health"))
    if notifier is not None:
        helpers.append(stop.watch(asyncio.create_task(notifier.run(), name="notify"), "notify"))
    if settings.rollout_aware and backend.api is not None:
        from sidecar.integration.rollout import RolloutWatcher

        rollout = RolloutWatcher(
            backend.api,
            backend.pod_namespace or backend.namespace,
            os.environ["POD_NAME"],
            elector.set_outdated,
            timeout=min(10.0, settings.renew_deadline),
        )
        helpers.append(stop.watch(asyncio.create_task(rollout.run(), name="rollout"), "rollout"))

    control.task = stop.watch(asyncio.create_task(elector.run(), name="elector"), "election loop")
    stack.push_async_callback(_stop_election, control, elector, budget)
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
    return structlog.contextvars.get_contextvars()


async def _stop_election(
    control: _Control, elector: Elector | ShardRunner, budget: _Budget
) -> None:
    """Cancel the loop, then tell the app and release, within the election's share of T."""
    log: Any = structlog.get_logger("app")
    assert control.task is not None
    control.task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await control.task  # a crash was reported by the supervisor already
    share = budget.left(budget.total * ELECTION_SHARE)
    try:
        async with asyncio.timeout(share):
            await elector.shutdown(timeout=share)
    except TimeoutError:
        log.warning("shutdown timed out before the release was confirmed", seconds=share)


def _listening(runner: web.BaseRunner) -> list[str]:
    addresses = []
    for address in runner.addresses:
        host, port = address[0], address[1]
        addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return addresses
