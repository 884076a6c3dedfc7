"""A toxiproxy server on loopback and a small client for its HTTP API.

One proxy per faulty link: a sidecar's kubeconfig points at ``Proxy.listen`` (127.0.0.1, which
the API server's certificate covers, so TLS passes straight through the TCP proxy) and the proxy
forwards to the API server. Toxics then black-hole, slow down or cut that link only.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.chaos.gobuild import build
from tests.kube.cluster import _die_with_parent, _stop, free_port


class ToxiproxyError(Exception):
    pass


class Toxiproxy:
    """`toxiproxy` (the server) as a child process, with its API on a free loopback port."""

    def __init__(self, log_dir: Path) -> None:
        self.api_port = free_port()
        self._log = log_dir / "toxiproxy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Toxiproxy:
        binary = build("toxiproxy")
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                [str(binary), "-host", "127.0.0.1", "-port", str(self.api_port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LOG_LEVEL": "warn"},
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        deadline = time.monotonic() + 15
        while True:
            try:
                self.request("GET", "/version")
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise ToxiproxyError(f"toxiproxy did not start; see {self._log}") from None
                time.sleep(0.05)  # polling a port that is not open yet

    def close(self) -> None:
        _stop(self._proc, kill=True)
        self._proc = None

    def __enter__(self) -> Toxiproxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
        try:
            conn.request(
                method,
                path,
                None if body is None else json.dumps(body),
                {"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            raise ToxiproxyError(f"{method} {path}: {resp.status} {raw.decode(errors='replace')}")
        return json.loads(raw) if raw.strip() else None

    def proxy(self, name: str, upstream_port: int) -> Proxy:
        """A new proxy 127.0.0.1:<free port> -> 127.0.0.1:`upstream_port`."""
        listen = f"127.0.0.1:{free_port()}"
        self.request(
            "POST",
            "/proxies",
            {"name": name, "listen": listen, "upstream": f"127.0.0.1:{upstream_port}"},
        )
        return Proxy(self, name, listen)


class Proxy:
    def __init__(self, server: Toxiproxy, name: str, listen: str) -> None:
        self.server, self.name, self.listen = server, name, listen
        self.port = int(listen.rsplit(":", 1)[1])
        self._toxics: set[str] = set()

    @property
    def url(self) -> str:
        return f"https://{self.listen}"

    def add_toxic(self, kind: str, stream: str, **attributes: float) -> str:
        name = f"{kind}_{stream}"
        self.server.request(
            "POST",
            f"/proxies/{self.name}/toxics",
            {
                "name": name,
                "type": kind,
                "stream": stream,
                "toxicity": 1.0,
                "attributes": attributes,
            },
        )
        self._toxics.add(name)
        return name

    def black_hole(self) -> None:
        """Accept and keep connections, but let nothing through either way (never close)."""
        for stream in ("upstream", "downstream"):
            self.add_toxic("timeout", stream, timeout=0)

    def latency(self, ms: int, jitter_ms: int = 0) -> None:
        """Delay every chunk of the API server's answers by `ms` (± `jitter_ms`)."""
        self.add_toxic("latency", "downstream", latency=ms, jitter=jitter_ms)

    def heal(self) -> None:
        """Remove every toxic (a removed `timeout` toxic closes the connections it held)."""
        for name in sorted(self._toxics):
            self.server.request("DELETE", f"/proxies/{self.name}/toxics/{name}")
        self._toxics.clear()
