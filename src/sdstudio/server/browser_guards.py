"""What a web page in the user's browser must not be able to do to a local server.

DNS rebinding: a page on evil.example re-points its name at 127.0.0.1 and calls the server as same-origin; its
requests carry `Host: evil.example`. So requests must name this server in Host: the bind address, localhost, or
a name the operator allows (`--allowed-host`; a server bound to every address accepts any Host unless names
are given).

Cross-site requests: a page elsewhere can POST a form or a no-cors fetch at the server (body-less routes such
as interrupt need no body to act). Browsers mark those with `Origin` (and `Sec-Fetch-Site: cross-site`); API
clients (webuiapi, SillyTavern's server, curl) send neither. So a state-changing request whose Origin is not
this server (or one the operator allows with `--allow-origin`) is refused with 403, and API clients work
unchanged. (Requiring a JSON content type instead would break A1111 clients, which POST interrupt bare.)"""

from __future__ import annotations

import json
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def allowed_hosts_for(bind: str, extra: Sequence[str] = ()) -> list[str] | None:
    """Host names to accept for a server bound to `bind` (None: any)."""
    if bind in ("0.0.0.0", "::", "") and not extra:
        return None
    return sorted({*LOOPBACK, bind, *extra})


def host_name(value: str) -> str:
    """The host part of a Host header: "[::1]:7860" -> "::1", "localhost:7860" -> "localhost"."""
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.rpartition(":")[0] if value.count(":") == 1 else value


class BrowserGuards:
    """ASGI middleware: the Host check (allowed_hosts None: off) and the cross-site check (origins: extra
    allowed origins, "*" turns it off)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] | None = None, origins: Sequence[str] = ()):
        self.app, self.hosts, self.origins = app, allowed_hosts, {o.rstrip("/") for o in origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host).lower() not in self.hosts:
            await _refuse(send, 400, f"Host {host!r} is not this server's name; allowed: {', '.join(self.hosts)} "
                                     "(the operator can add one with --allowed-host)")
            return
        if scope["method"] not in SAFE_METHODS and "*" not in self.origins and self._cross_site(headers, host):
            await _refuse(send, 403, "a cross-site request from a web page cannot change this server's state; "
                                     "call the API from a program, or the operator can allow the page's origin "
                                     "with --allow-origin")
            return
        await self.app(scope, receive, send)

    def _cross_site(self, headers: dict[str, str], host: str) -> bool:
        origin = headers.get("origin")
        if origin is not None:
            return origin.rstrip("/") not in self.origins and urlsplit(origin).netloc.lower() != host.lower()
        return headers.get("sec-fetch-site") == "cross-site"


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"error": "refused", "detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
