"""What every request body passes before a route sees it: a size limit that holds for chunked bodies too
(bytes are counted as they arrive; 413 past the limit), and JSON that is plain data: no NaN or Infinity (JSON
has none; Python's parser accepts them), no lone UTF-16 surrogates (they cannot become UTF-8 text), no
nesting deep enough to exhaust the parser. Each refusal is a 4xx naming the field, in the route's own error
shape (the check runs inside the route, where the app's error handlers apply)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sdstudio.errors import RequestError

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = 64  # JSON nesting a request may have (ours need 4)


class BodyLimit:
    """ASGI middleware: at most `limit` bytes per request body, whatever Content-Length says or omits."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(int(length), send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"the request body is over {self.limit} bytes, the limit")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, length: int, send: Send) -> None:
        body = json.dumps({"error": "too large", "detail": f"the request body is {length} bytes; the limit is "
                           f"{self.limit}"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class CheckedJSONRoute(APIRoute):
    """A route whose JSON body is parsed once, checked (checked_json), and handed to FastAPI as parsed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if "json" in request.headers.get("content-type", "json"):
                body = await request.body()
                if body:
                    parsed = checked_json(body)
                    if parsed is not _INVALID:
                        request._json = parsed  # what Request.json() returns: FastAPI parses nothing again
            return await handler(request)

        return checked


_INVALID = object()  # not JSON at all: FastAPI's own error says where


def checked_json(body: bytes) -> Any:
    """The parsed body, or a RequestError naming the first field that is not plain JSON data."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError("the request body is not UTF-8: send JSON encoded as UTF-8", "body") from None
    except RecursionError:
        raise RequestError(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)", "body") from None
    except ValueError:
        return _INVALID
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, where, depth = stack.pop()
        name = where or "body"
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{name}: {value} is not a number JSON allows; send a finite number", name)
        if isinstance(value, str) and _SURROGATE.search(value):
            raise RequestError(f"{name}: the text holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not a "
                               "character; send valid Unicode", name)
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise RequestError(f"{name}: nested too deeply (at most {MAX_DEPTH} levels)", name)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise RequestError(f"{name}: a key holds a lone UTF-16 surrogate; send valid Unicode", name)
                stack.append((item, f"{where}.{key}" if where else str(key), depth + 1))
    return data
