"""ASGI middleware: request ids, the bearer token, a cap on request body size, and text
that no database can store."""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections.abc import Collection
from typing import Any, cast

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("ralph.http")


class RequestIdMiddleware:
    """Binds a request id (from `X-Request-ID` or a new one) to logs, echoes it back, and
    logs one line per request (method, path, status, milliseconds)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming[:64] if incoming.isprintable() and incoming else uuid.uuid4().hex

        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                log.info(
                    "request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    ms=round((time.perf_counter() - started) * 1000, 2),
                )


async def reply_error(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Send a JSON `{"detail": ...}` answer, as the app's error handlers do."""
    body = json.dumps({"detail": detail}).encode()
    all_headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


class TokenMiddleware:
    """Requires `Authorization: Bearer <token>` on every path but `public`, before the
    request is routed or its body read: a request without the token learns nothing, not
    even whether its body would have been valid."""

    def __init__(self, app: ASGIApp, token: str, public: Collection[str]) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self._public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public:
            await self.app(scope, receive, send)
            return
        supplied = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(supplied, self._expected):
            await reply_error(
                send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")]
            )
            return
        await self.app(scope, receive, send)


# a JSON escape of a UTF-16 surrogate; only bodies that have one are parsed here
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        items = cast("dict[str, Any]", value)  # JSON object keys are strings
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in items.items())
    if isinstance(value, list):
        elements = cast("list[Any]", value)
        return any(_has_lone_surrogate(v) for v in elements)
    return False


class UnicodeGuardMiddleware:
    """Answers 422 to a JSON body holding a lone surrogate (`"a\\ud800"`): valid JSON, but
    not Unicode text, so no database can store it. A pair that encodes one character
    (`"\\ud83d\\ude00"`) is fine. Reads the body first: place it inside the size cap."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if _SURROGATE_ESCAPE.search(body) and _decodes_to_lone_surrogate(body):
            await reply_error(
                send,
                422,
                "body: text must be valid Unicode (a lone surrogate such as \\ud800 is not)",
            )
            return
        whole: Message = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay(whole, receive), send)


def _decodes_to_lone_surrogate(body: bytes) -> bool:
    try:
        return _has_lone_surrogate(json.loads(body))
    except ValueError:
        return False  # not JSON: the app answers that


def _replay(first: Message, receive: Receive) -> Receive:
    """`receive` that hands out `first` once, then reads on."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


class BodySizeLimitMiddleware:
    """Answers 413 to a request whose body exceeds `max_bytes`, before any handler reads it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        response_started = False
        rejected = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Answer now and make the app see a client that went away; whatever it
                    # sends afterwards is dropped.
                    rejected = True
                    if not response_started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, send: Send) -> None:
        await reply_error(send, 413, f"request body larger than {self.max_bytes} bytes")
