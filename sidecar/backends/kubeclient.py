"""A small Kubernetes REST client on top of kubernetes-asyncio's configuration and transport.

kubernetes-asyncio's package `__init__` files import every API class and model (about 1,260
modules, ~70 MB RSS, ~0.4 s) although the sidecar needs four calls on one resource. We load only
the modules that hold what we use -- kubeconfig/in-cluster loading with its auth plugins and the
aiohttp transport with its TLS set-up -- and speak JSON to the API ourselves. The packages whose
`__init__` would pull everything in are registered as plain namespace modules first; if anything
later asks one of them for a name we did not load, the real `__init__` runs then, so the shortcut
can never hide a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import types
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aiohttp

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60.0


def _lean_import() -> types.SimpleNamespace:
    """Import the few kubernetes-asyncio modules we use without their packages' `__init__`."""
    for package in ("kubernetes_asyncio", "kubernetes_asyncio.client"):
        if package not in sys.modules:
            spec = importlib.util.find_spec(package)
            if spec is None or spec.submodule_search_locations is None:
                raise ImportError(f"{package} is not installed")
            module = types.ModuleType(package)
            module.__path__ = list(spec.submodule_search_locations)
            module.__spec__ = spec
            module.__getattr__ = _run_real_init(module, spec)  # type: ignore[method-assign]
            sys.modules[package] = module
    configuration = importlib.import_module("kubernetes_asyncio.client.configuration")
    rest = importlib.import_module("kubernetes_asyncio.client.rest")
    client = sys.modules["kubernetes_asyncio.client"]
    # kube_config.py does `from kubernetes_asyncio.client import ApiClient, Configuration`; it
    # only uses ApiClient for `new_client_from_config`, which we never call.
    client.Configuration = configuration.Configuration  # type: ignore[attr-defined]
    client.ApiClient = None  # type: ignore[attr-defined]
    kube_config = importlib.import_module("kubernetes_asyncio.config.kube_config")
    incluster = importlib.import_module("kubernetes_asyncio.config.incluster_config")
    exception = importlib.import_module("kubernetes_asyncio.config.config_exception")
    return types.SimpleNamespace(
        Configuration=configuration.Configuration,
        RESTClientObject=rest.RESTClientObject,
        load_kube_config=kube_config.load_kube_config,
        InClusterConfigLoader=incluster.InClusterConfigLoader,
        ConfigException=exception.ConfigException,
    )


def _run_real_init(module: types.ModuleType, spec: Any) -> Any:
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        del module.__getattr__  # run once
        code = spec.loader.get_code(module.__name__)
        exec(code, module.__dict__)
        return getattr(module, name)

    return __getattr__


_k8s: types.SimpleNamespace | None = None


def k8s() -> types.SimpleNamespace:
    global _k8s
    if _k8s is None:
        _k8s = _lean_import()
    return _k8s


class ApiError(Exception):
    """The API server answered with an error status (the message is its Status message).

    `retry_after` is the answer's Retry-After in seconds, if it carried one (429, 503...).
    """

    def __init__(
        self, status: int, reason: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


class Unreachable(Exception):
    """No usable HTTP answer: connection refused or reset, TLS failure, timeout."""


class BadAnswer(Unreachable):
    """An answer that is not the JSON asked for (an HTML page from a proxy, a truncated body,
    a garbage watch line). Callers treat it as no answer: a write may or may not have landed."""


# Told of every request: (verb, code, seconds). verb is the HTTP method, or WATCH for a watch;
# code the HTTP status, `error` (no answer) or `timeout`; seconds None when the failure came
# after the answer (a watch stream broke), so there is no latency to report.
RequestObserver = Callable[[str, str, float | None], None]


def in_cluster(service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        and (service_account_dir / "token").is_file()
    )


class _TokenFile:
    """A service-account token that is re-read when the file changes, as bound tokens rotate.

    A stat per request is cheaper than a stale token: kubelet swaps the file (a symlink) when
    it refreshes the token, and we also re-read at least every minute and after a 401.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._read_at = 0.0
        self.token = ""

    def current(self, force: bool = False) -> str:
        stat = self._path.stat()
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        stale = time.monotonic() - self._read_at > TOKEN_REREAD_SECONDS
        if force or stale or stamp != self._stamp:
            token = self._path.read_text().strip()
            if not token:
                raise ApiError(401, "Unauthorized", f"token file {self._path} is empty")
            self.token, self._stamp, self._read_at = token, stamp, time.monotonic()
        return self.token


@dataclass(frozen=True)
class Connection:
    host: str
    namespace: str | None  # the kubeconfig context's or the service account's namespace
    source: str  # for messages: "in-cluster" or the kubeconfig path


@dataclass(eq=False)
class _Transport:
    """One loaded configuration and the HTTP session built from it.

    A re-authentication installs a new one; the old one is closed only once the requests that
    use it (a long watch, say) have ended, so that none of them is cut off.
    """

    configuration: Any
    rest: Any
    users: int = 0  # requests in flight


class KubeApi:
    """JSON over the API server, with timeouts on every call and re-authentication on 401."""

    def __init__(
        self,
        kubeconfig: str | None,
        context: str | None = None,
        service_account_dir: Path = SERVICE_ACCOUNT_DIR,
    ) -> None:
        self._kubeconfig = kubeconfig
        self._sa_dir = service_account_dir
        self._context = context
        self._token_file: _TokenFile | None = None
        self._transport: _Transport | None = None
        self._retired: set[_Transport] = set()  # replaced, still serving requests in flight
        self.connection: Connection | None = None
        self.observer: RequestObserver | None = None  # metrics; must not raise or block

    async def connect(self) -> Connection:
        """Load credentials: a kubeconfig when given, else the pod's service account."""
        lib = k8s()
        configuration = lib.Configuration()
        if self._kubeconfig:
            await lib.load_kube_config(
                config_file=self._kubeconfig,
                context=self._context,
                client_configuration=configuration,
                persist_config=False,
            )
            namespace = _kubeconfig_namespace(self._kubeconfig, self._context)
            source = self._kubeconfig
        else:
            loader = lib.InClusterConfigLoader(
                token_filename=str(self._sa_dir / "token"),
                cert_filename=str(self._sa_dir / "ca.crt"),
                try_refresh_token=False,
            )
            loader.load_and_set(configuration)
            self._token_file = _TokenFile(self._sa_dir / "token")
            ns_file = self._sa_dir / "namespace"
            namespace = ns_file.read_text().strip() if ns_file.is_file() else None
            source = "in-cluster service account"
        old, self._transport = (
            self._transport,
            _Transport(configuration, lib.RESTClientObject(configuration)),
        )
        if old is not None:
            self._retired.add(old)
            await self._close_if_unused(old)
        self.connection = Connection(configuration.host, namespace, source)
        return self.connection

    async def close(self) -> None:
        transports = [*self._retired, *([self._transport] if self._transport else [])]
        self._transport = None
        self._retired.clear()
        for transport in transports:
            await transport.rest.close()

    @contextlib.asynccontextmanager
    async def _use(self) -> AsyncIterator[_Transport]:
        transport = self._transport
        if transport is None:
            raise Unreachable("the Kubernetes client is closed")
        transport.users += 1
        try:
            yield transport
        finally:
            transport.users -= 1
            await self._close_if_unused(transport)

    async def _close_if_unused(self, transport: _Transport) -> None:
        if transport.users == 0 and transport in self._retired:
            self._retired.discard(transport)
            await transport.rest.close()

    async def _headers(self, transport: _Transport, force_token: bool) -> dict[str, str]:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        headers["User-Agent"] = "leader-sidecar"
        if self._token_file is not None:
            headers["Authorization"] = "Bearer " + self._token_file.current(force_token)
            return headers
        try:
            auth = await transport.configuration.auth_settings()
        except Exception as exc:  # an exec plugin or token refresh failed: no request then
            raise Unreachable(f"cannot get credentials from {self._kubeconfig}: {exc}") from exc
        bearer = auth.get("BearerToken")
        if bearer:
            headers["Authorization"] = bearer["value"]
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float,
        query: dict[str, str] | None = None,
    ) -> Any:
        """One call; returns the decoded JSON (None for an empty body) or raises ApiError /
        Unreachable (BadAnswer when the answer is not JSON)."""
        for attempt in range(2):
            started = time.monotonic()
            async with self._use() as transport:
                try:
                    async with asyncio.timeout(timeout):
                        response = await self._send(
                            transport, method, path, body, query, attempt > 0, None
                        )
                        async with response:
                            data = await response.read()
                except _TRANSPORT_ERRORS as exc:
                    self._tell(method, _failure_code(exc), started)
                    raise Unreachable(_describe_transport(exc, self._host())) from exc
            self._tell(method, str(response.status), started)
            if response.status == 401 and attempt == 0:
                await self._reauthenticate()
                continue
            if response.status >= 400:
                raise _api_error(response, data)
            return _decode(response, data, self._host())
        raise AssertionError("not reached")

    async def stream(
        self, path: str, query: dict[str, str], *, timeout: float, idle_timeout: float
    ) -> AsyncGenerator[Any, None]:
        """A watch: `{"type": "OPENED"}` once the server accepted it, then one decoded JSON
        value per line until the server ends it.

        `idle_timeout` bounds the silence between lines: after that long without a line the
        stream simply ends (the caller reads again, which fails if the connection is dead).
        A line that is not JSON raises BadAnswer.
        """
        async with self._use() as transport:
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    response = await self._send(
                        transport, "GET", path, None, query, False, idle_timeout
                    )
            except _TRANSPORT_ERRORS as exc:
                self._tell("WATCH", _failure_code(exc), started)
                raise Unreachable(_describe_transport(exc, self._host())) from exc
            self._tell("WATCH", str(response.status), started)
            async with response:
                if response.status >= 400 or not _is_json(response.content_type):
                    await self._refuse(response, timeout)
                yield {"type": "OPENED"}
                try:
                    async for line in response.content:
                        if line.strip():
                            yield _decode_line(line, self._host())
                except TimeoutError:
                    return  # no line for idle_timeout: a normal end, the caller watches again
                except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                    self._tell("WATCH", "error", None)
                    raise Unreachable(_describe_transport(exc, self._host())) from exc
                except ValueError as exc:  # aiohttp: a line longer than its buffer
                    raise BadAnswer(f"the API server at {self._host()} sent {exc}") from exc

    async def _refuse(self, response: aiohttp.ClientResponse, timeout: float) -> NoReturn:
        """A watch answered with an error status or something that is not JSON."""
        try:
            async with asyncio.timeout(timeout):
                if response.status >= 400:
                    data = await response.read()
                else:
                    data = await response.content.read(PREVIEW_BYTES + 1)
        except _TRANSPORT_ERRORS as exc:
            raise Unreachable(_describe_transport(exc, self._host())) from exc
        if response.status == 401:
            await self._reauthenticate()
        if response.status >= 400:
            raise _api_error(response, data)
        raise BadAnswer(_describe_answer(self._host(), response, data))

    def _tell(self, verb: str, code: str, started: float | None) -> None:
        if self.observer is not None:
            seconds = None if started is None else time.monotonic() - started
            self.observer(verb, code, seconds)

    async def _send(
        self,
        transport: _Transport,
        method: str,
        path: str,
        body: Any,
        query: dict[str, str] | None,
        force_token: bool,
        idle_timeout: float | None,
    ) -> aiohttp.ClientResponse:
        headers = await self._headers(transport, force_token)
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        configuration = transport.configuration
        response: aiohttp.ClientResponse = await transport.rest.pool_manager.request(
            method,
            configuration.host + path,
            params=query,
            data=json.dumps(body) if body is not None else None,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=idle_timeout),
            proxy=configuration.proxy,
            server_hostname=configuration.tls_server_name,
        )
        return response

    async def _reauthenticate(self) -> None:
        """After a 401: re-read the token file, or reload the kubeconfig (exec plugins...).

        The reload installs a new transport; requests in flight finish on the old one.
        """
        if self._token_file is not None or not self._kubeconfig:
            return  # the next request re-reads the token file (force_token)
        try:
            await self.connect()
        except Exception as exc:  # a broken kubeconfig: the 401 stands, with the reason
            raise ApiError(
                401, "Unauthorized", f"credentials refused; reloading {self._kubeconfig}: {exc}"
            ) from exc

    def _host(self) -> str:
        return str(self._transport.configuration.host) if self._transport else "?"


# What a request can end with when there is no usable answer. RuntimeError: aiohttp's "Session
# is closed" when close() raced a request.
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError, RuntimeError)
PREVIEW_BYTES = 120


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


def _preview(data: bytes) -> str:
    text = data[:PREVIEW_BYTES].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(data) > PREVIEW_BYTES else ""))


def _describe_answer(host: str, response: aiohttp.ClientResponse, data: bytes) -> str:
    content_type = response.headers.get("Content-Type") or "no content type"
    return (
        f"the API server at {host} answered {response.status} with {content_type} instead of "
        f"JSON: {_preview(data)}"
    )


def _decode(response: aiohttp.ClientResponse, data: bytes, host: str) -> Any:
    if not data:
        return None
    if not _is_json(response.content_type):
        raise BadAnswer(_describe_answer(host, response, data))
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise BadAnswer(
            f"the API server at {host} answered {response.status} with JSON that does not "
            f"parse (truncated?): {exc}: {_preview(data)}"
        ) from exc


def _decode_line(line: bytes, host: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise BadAnswer(
            f"the API server at {host} sent a watch line that is not JSON: {_preview(line)}"
        ) from exc


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds: delta-seconds or an HTTP-date; None if absent/invalid."""
    if not value or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _api_error(response: aiohttp.ClientResponse, data: bytes) -> ApiError:
    reason, message = response.reason or "", ""
    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    status_obj: Any = None
    if _is_json(response.content_type):
        try:
            status_obj = json.loads(data)
        except (ValueError, RecursionError):
            status_obj = None
    if isinstance(status_obj, dict):
        message = str(status_obj.get("message", ""))
        reason = str(status_obj.get("reason") or reason)
    elif data:
        message = f"{response.headers.get('Content-Type') or 'no content type'}: {_preview(data)}"
    return ApiError(response.status, reason, message, retry_after)


def _failure_code(exc: BaseException) -> str:
    return "timeout" if isinstance(exc, TimeoutError) else "error"


def _describe_transport(exc: BaseException, host: str) -> str:
    if isinstance(exc, TimeoutError):
        return f"the API server at {host} did not answer in time"
    return f"cannot reach the API server at {host}: {exc or type(exc).__name__}"


def _kubeconfig_namespace(path: str, context: str | None) -> str | None:
    """The namespace of the kubeconfig's (current) context, if it names one."""
    import yaml  # a kubernetes-asyncio dependency; only needed on this path

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    name = context or doc.get("current-context")
    for entry in doc.get("contexts") or []:
        if entry.get("name") == name:
            namespace = (entry.get("context") or {}).get("namespace")
            return str(namespace) if namespace else None
    return None
