"""How `DirectOpenAI` posts a request: one shared connection pool per model factory.

Measured against the scripted model server with 50 requests in flight (bench/transport.py,
figures in docs/benchmarks.md), an httpx client spends 0.7-0.8 ms of CPU per request with its
default pool (20 connections kept alive, so most requests open a new one) and about 5 ms with a
pool as large as the window (httpcore checks every idle connection on each request); aiohttp
spends about 0.12 ms. Agents make thousands of calls on one event loop, so the hot path uses
aiohttp; the httpx transport serves the in-process dev model (an httpx MockTransport).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
import httpx


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


class TransportError(Exception):
    """The request got no HTTP reply: refused, dropped or timed out. Worth retrying."""


class Transport(Protocol):
    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], time_limit: float
    ) -> Reply: ...

    async def aclose(self) -> None: ...


class _Shared:
    """Models are deep-copied by Agno in places; the copies keep the same pool."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self


class AiohttpTransport(_Shared):
    """An aiohttp session, created on first use (it belongs to the running event loop)."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[str, str | None] = {}

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], time_limit: float
    ) -> Reply:
        try:
            if url not in self._proxies:
                self._proxies[url] = proxy_for(url)
            async with self._open().post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=time_limit),
                proxy=self._proxies[url],
            ) as response:
                return Reply(response.status, response.headers, await response.read())
        except TimeoutError as exc:
            raise TransportError(f"no reply within {time_limit:g} s") from exc
        except aiohttp.ClientError as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for `url` (HTTP_PROXY / HTTPS_PROXY, NO_PROXY), read
    as the SDK's httpx client reads it. (aiohttp's own `trust_env` would also look up
    ~/.netrc on every request, in a thread, and clash with the Authorization header.)"""
    parts = urlsplit(url)
    proxy = getproxies().get(parts.scheme)
    if proxy is None or (parts.hostname is not None and proxy_bypass(parts.hostname)):
        return None
    return proxy


class HttpxTransport(_Shared):
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], time_limit: float
    ) -> Reply:
        try:
            response = await self.client.post(
                url, content=body, headers=headers, timeout=time_limit
            )
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        return Reply(response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self.client.aclose()
