"""ASGI middleware: request ids, the bearer token, a cap on request body size, and text
that no database can store."""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from collections.abc import Collection
from http.cookies import CookieError, SimpleCookie
from typing import Any, cast
from urllib.parse import quote

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ralph.console.sessions import (
    COOKIE,
    CSRF_HEADER,
    Sessions,
    is_reviewer,
    reviewer_may,
    signature_of,
)

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


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _cross_site(headers: dict[bytes, bytes], own: frozenset[bytes], scheme: str) -> bool:
    """A browser's request from another site (its `Origin` is neither this server's host nor
    one of `own`, the origins people reach it at; or its `Sec-Fetch-Site` says so). Scripts
    and curl send neither: they are not refused."""
    origin = headers.get(b"origin")
    if origin is not None and origin in own:
        return False
    if headers.get(b"sec-fetch-site") == b"cross-site":
        return True
    if origin is None:
        return False
    host = headers.get(b"host", b"")
    # the scheme counts: https://host:port is another origin than this http://host:port
    return origin == b"null" or origin != scheme.encode() + b"://" + host


class AccessMiddleware:
    """Who may do what, before a request is routed or its body read (a request without a
    credential learns nothing, not even whether its body would have been valid).

    - A state-changing request from another site (`Origin`: not this server's host, nor
      `own_origins`) is refused (403), token or not.
    - With a token configured, every path but `public` needs `Authorization: Bearer <token>`
      or a console session cookie; a cookie's state-changing requests also need the session's
      `X-Ralph-CSRF` header. A reviewer's token (or its session) may read, approve and reject,
      nothing else (403). Console pages without a credential redirect to its login.
    """

    def __init__(
        self,
        app: ASGIApp,
        sessions: Sessions | None,
        public: Collection[str],
        public_prefixes: tuple[str, ...] = (),
        own_origins: Collection[str] = (),
    ) -> None:
        self.app = app
        self._sessions = sessions
        self._public = frozenset(public)
        self._public_prefixes = public_prefixes
        # where people reach this server through a proxy that rewrites Host (RALPH_PUBLIC_URL)
        self._own = frozenset(origin.encode() for origin in own_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers = dict(scope["headers"])
        if method not in _SAFE_METHODS and _cross_site(headers, self._own, scope["scheme"]):
            await reply_error(send, 403, "cross-site request refused")
            return
        sessions = self._sessions
        if sessions is None or path in self._public or path.startswith(self._public_prefixes):
            await self.app(scope, receive, send)
            return
        client = _client_of(scope)
        wait = sessions.failures.wait_seconds(client)
        if wait is not None and _has_credential(headers):
            retry = str(math.ceil(wait)).encode()
            await reply_error(
                send, 429, "too many wrong tokens from this client", [(b"retry-after", retry)]
            )
            return
        role, session = self._credential(sessions, headers)
        if session is not None and await _revoked(scope, session):
            role, session = None, None  # logged out: a copy of its cookie is no credential
        if role is None and _has_credential(headers):
            sessions.failures.failed(client)
        if role is None:
            if path.startswith("/console") and method == "GET":
                query = scope.get("query_string", b"").decode(errors="replace")
                back = f"{path}?{query}" if query else path
                await _redirect(send, f"/console/login?next={quote(back, safe='/')}")
                return
            await reply_error(
                send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")]
            )
            return
        if session is not None and method not in _SAFE_METHODS:
            supplied = headers.get(CSRF_HEADER.lower().encode(), b"").decode(errors="replace")
            if not secrets.compare_digest(supplied, sessions.csrf(session)):
                await reply_error(send, 403, f"missing or wrong {CSRF_HEADER} header")
                return
        if is_reviewer(role) and not reviewer_may(method, path):
            await reply_error(
                send, 403, "the reviewer token may only read, approve and reject proposals"
            )
            return
        scope.setdefault("state", {})["role"] = role
        await self.app(scope, receive, send)

    @staticmethod
    def _credential(
        sessions: Sessions, headers: dict[bytes, bytes]
    ) -> tuple[str | None, str | None]:
        """(the role, the session cookie if that is the credential)."""
        authorization = headers.get(b"authorization")
        if authorization is not None:
            scheme, _, token = authorization.decode(errors="replace").partition(" ")
            role = sessions.role_of_token(token) if scheme == "Bearer" else None
            return role, None
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", b"").decode(errors="replace"))
        except CookieError:  # a malformed Cookie header is no credential
            return None, None
        morsel = cookie.get(COOKIE)
        if morsel is None:
            return None, None
        role = sessions.role(morsel.value)
        return role, morsel.value if role else None


async def _revoked(scope: Scope, session: str) -> bool:
    services: Any = getattr(scope["app"].state, "services", None)
    return services is not None and await services.revoked_sessions.is_revoked(
        signature_of(session)
    )


def _client_of(scope: Scope) -> str:
    """The client's address (a proxy's own, unless uvicorn trusts its forwarded headers)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _has_credential(headers: dict[bytes, bytes]) -> bool:
    return b"authorization" in headers or COOKIE.encode() in headers.get(b"cookie", b"")


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


# a JSON escape of a UTF-16 surrogate; only bodies that have one are parsed here
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_NUL = re.compile("\x00")
# NUL reaches JSON only escaped (a raw control character is not JSON)
_NUL_ESCAPE = re.compile(rb"\\u0000")


def _has_text(value: Any, pattern: re.Pattern[str]) -> bool:
    # a walk with a stack of its own: a body may nest deeper than Python's recursion limit
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if pattern.search(item) is not None:
                return True
        elif isinstance(item, dict):
            items = cast("dict[str, Any]", item)  # JSON object keys are strings
            stack.extend(items.keys())
            stack.extend(items.values())
        elif isinstance(item, list):
            stack.extend(cast("list[Any]", item))
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
        if _NUL_ESCAPE.search(body) and _decodes_to_nul(body):
            await reply_error(send, 422, "body: NUL characters (\\u0000) are not allowed in text")
            return
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
    return _decodes_to(body, _LONE_SURROGATE)


def _decodes_to_nul(body: bytes) -> bool:
    return _decodes_to(body, _NUL)


def _decodes_to(body: bytes, pattern: re.Pattern[str]) -> bool:
    """Whether a string of the JSON `body` (a key or a value) holds `pattern`."""
    try:
        return _has_text(json.loads(body), pattern)
    except (ValueError, RecursionError):
        return False  # not JSON, or nested too deep to read: the app answers that


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
