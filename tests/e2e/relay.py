"""A TCP relay on loopback that a test can freeze: bytes stop flowing both ways, connections
stay open (as a black-holed network link looks to the sidecar), until `thaw()`.

TLS passes straight through, so a kubeconfig pointing at the relay reaches the real API server
(its certificate covers 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from pathlib import Path


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self.connections = 0  # accepted so far
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def kubeconfig(self, original: Path, path: Path) -> Path:
        """A copy of `original` whose server is this relay."""
        text = original.read_text()
        text = re.sub(r"(server: \"?https://127\.0\.0\.1:)\d+", rf"\g<1>{self.port}", text)
        path.write_text(text)
        path.chmod(0o600)
        return path

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            # Connecting counts as flowing: a frozen link accepts and then says nothing.
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            self._sockets += [client, upstream]
            self.connections += 1
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if self._closed:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
