"""The status page for browsers at `GET /`: one self-contained HTML file (status_page.html).

It loads nothing from anywhere but this sidecar: the styles and script are inline, and a
Content-Security-Policy with their hashes lets the browser run exactly those and connect only
back to the sidecar (for the `/leader?watch=true` event stream), so it works offline and cannot
be made to load anything else.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


_SHARDS_OFF = b'<meta name="leader-sidecar-shards" content="off">'


@functools.cache
def page(shards: bool = False) -> tuple[bytes, dict[str, str]]:
    """The page and its headers (read and hashed once per variant). With `shards` the page
    follows `/shards` too; the mark sits outside the script, so its hash does not change."""
    body = resources.files("sidecar.api").joinpath("status_page.html").read_bytes()
    if shards:
        body = body.replace(_SHARDS_OFF, _SHARDS_OFF.replace(b'"off"', b'"on"'))
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for match in _INLINE.finditer(body):
        digest = base64.b64encode(hashlib.sha256(match.group(2)).digest()).decode()
        hashes[match.group(1)].append(f"'sha256-{digest}'")
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(hashes[b"script"]),
            "style-src " + " ".join(hashes[b"style"]),
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "Content-Type": "text/html; charset=utf-8",
        "Cache-Control": "no-cache",
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Vary": "Accept",
    }
    return body, headers
