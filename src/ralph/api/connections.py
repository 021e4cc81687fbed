"""Bounds on the server's connections, which uvicorn does not have: the time a client may take
to send a request's headers, and how many connections are open at once.

Without them, clients that open connections and send part of a request (no token needed) hold
a file descriptor each until the process has none left. uvicorn times out idle keep-alive
connections, but not a request whose headers never end. In production, put a proxy (nginx,
HAProxy, a cloud load balancer) in front as well: it buffers slow clients and holds far more
connections than one Python process should.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("uvicorn.error")


def bounded_protocol(header_timeout_seconds: float, max_connections: int) -> type[Any]:
    """uvicorn's HTTP protocol, closing a connection whose request headers have not all
    arrived `header_timeout_seconds` after it opened (or after its previous response). Past
    `max_connections` open ones, a new connection closes the one that has waited longest for
    its headers (a slow or idle client makes room for a new one), or is closed itself when
    every connection is busy with a request."""

    class BoundedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                waiting = [
                    c
                    for c in self.connections
                    if isinstance(c, BoundedHttpProtocol) and c._header_timer is not None
                ]
                if not waiting:
                    log.warning("connection refused: %d connections open", len(self.connections))
                    transport.abort()
                    return
                oldest = min(waiting, key=lambda c: c._header_timer.when())  # type: ignore[union-attr]
                oldest._headers_too_slow()
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refuses (a malformed request line or header, a
            request line too long: 10,000 query parameters) gets the API's JSON error shape,
            not uvicorn's plain text."""
            body = json.dumps({"detail": f"the request could not be read: {msg}"}).encode()
            head = [
                b"HTTP/1.1 400 Bad Request",
                b"content-type: application/json",
                b"content-length: " + str(len(body)).encode(),
                b"connection: close",
            ]
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            self.transport.close()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(
                    header_timeout_seconds, self._headers_too_slow
                )

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.abort()

    return BoundedHttpProtocol
