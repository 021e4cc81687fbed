"""A real HTTP server speaking the OpenAI chat-completions protocol, with scripted replies.

Start it on a free loopback port, point an `OpenAILike`/`OpenRouter` model (or Ralph's
`openai` provider) at `server.base_url`, and decide each answer with a responder:

    with ModelServer(scripted(call("list_memory_blocks"), text("done"))) as server:
        ...

The responder sees the parsed request body and returns a `Reply` (text and/or tool calls),
`Fail` (an HTTP error), `Garbage` (a 200 with a body that is not JSON) or `Delay` (wait, then
act). Replies stream as server-sent events when the client asks for `stream: true`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ralph.agents.wire import Reply, ToolCall, completion, sse, stream_chunks, turn_of
from ralph.testing.processes import free_port


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer with an HTTP error, as a provider does when overloaded or broken."""

    status: int
    message: str = "scripted failure"
    headers: dict[str, str] = field(default_factory=dict[str, str])


@dataclass(frozen=True, slots=True)
class Garbage:
    """Answer 200 with a body that is not a chat completion."""

    body: str = "{this is not json"


@dataclass(frozen=True, slots=True)
class Delay:
    """Wait `seconds` (in real time), then act."""

    seconds: float
    then: Action


Action = Reply | Fail | Garbage | Delay
Responder = Callable[[dict[str, Any]], Action | Awaitable[Action]]


def text(content: str) -> Reply:
    return Reply(content=content)


def call(name: str, **arguments: Any) -> Reply:
    return Reply(tool_calls=(ToolCall(name, arguments),))


def scripted(*steps: Action) -> Responder:
    """The n-th model call of each conversation gets `steps[n]` (the last step repeats).

    Conversations are told apart by their own messages, so concurrent agents each follow the
    script from the start.
    """

    def respond(request: dict[str, Any]) -> Action:
        return steps[min(turn_of(request), len(steps) - 1)]

    return respond


def in_order(*actions: Action, then: Responder | None = None) -> Responder:
    """Server-wide sequence: the k-th request gets `actions[k]`, later ones go to `then`."""
    queue = list(actions)
    lock = threading.Lock()

    def respond(request: dict[str, Any]) -> Action:
        with lock:
            if queue:
                return queue.pop(0)
        if then is None:
            return text("done")
        result = then(request)
        assert not inspect.isawaitable(result), "in_order needs a synchronous `then`"
        return result

    return respond


class ModelServer:
    """Serves the protocol on 127.0.0.1:<free port> from a background thread."""

    def __init__(self, responder: Responder, *, model: str = "scripted-model") -> None:
        self.responder = responder
        self.model = model
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        # client (host, port) pairs seen: the number of connections clients opened
        self.clients: set[tuple[str, int]] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.failures: dict[int, int] = {}  # errors answered, by status
        self.arrivals: list[float] = []  # each request's arrival (time.monotonic())
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._complete, methods=["POST"]),
                Route("/stats", self._stats, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ModelServer:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("model server failed to start")
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        # don't wait for scripted delays still in progress
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> ModelServer:
        return self if self._thread.is_alive() else self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def calls(self) -> int:
        return len(self.requests)

    async def wait_for_in_flight(self, count: int, timeout_seconds: float = 10.0) -> None:
        """Return once at least `count` requests are being answered at the same time."""
        async with asyncio.timeout(timeout_seconds):
            # the counter lives on the server's thread: poll it
            while self.in_flight < count:  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The server thread's event loop (for responders that await events)."""
        return self._loop

    async def _stats(self, _: Request) -> Response:
        """Counters, for a client in another process."""
        return JSONResponse(
            {
                "calls": self.calls,
                "max_in_flight": self.max_in_flight,
                "connections": len(self.clients),
                "failures": {str(k): v for k, v in self.failures.items()},
                "arrivals": self.arrivals,
            }
        )

    async def _complete(self, request: Request) -> Response:
        self._loop = asyncio.get_running_loop()
        body = await request.json()
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.requests.append(body)
            if request.client is not None:
                self.clients.add((request.client.host, request.client.port))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            action = self.responder(body)
            if inspect.isawaitable(action):
                action = await action
            return await self._act(action, bool(body.get("stream")))
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _act(self, action: Action, stream: bool) -> Response:
        while isinstance(action, Delay):
            await asyncio.sleep(action.seconds)
            action = action.then
        if isinstance(action, Fail):
            with self._lock:
                self.failures[action.status] = self.failures.get(action.status, 0) + 1
            error = {"error": {"message": action.message, "type": "scripted", "code": None}}
            return JSONResponse(error, status_code=action.status, headers=action.headers)
        if isinstance(action, Garbage):
            return Response(action.body, media_type="application/json")
        if stream:
            return StreamingResponse(
                iter(list(sse(stream_chunks(action, self.model)))),
                media_type="text/event-stream",
            )
        return Response(json.dumps(completion(action, self.model)), media_type="application/json")


def served(responder: Responder, **kwargs: Any) -> ModelServer:
    """A started server (use as a context manager, or call `stop()`)."""
    return ModelServer(responder, **kwargs).start()


__all__: Sequence[str] = [
    "Action",
    "Delay",
    "Fail",
    "Garbage",
    "ModelServer",
    "Reply",
    "Responder",
    "ToolCall",
    "call",
    "in_order",
    "scripted",
    "served",
    "text",
]


def _main() -> None:
    """Serve a fixed script from its own process (for benchmarks): each conversation's n-th
    call gets the n-th step; `tool:NAME` asks for that tool, anything else is answered text."""
    import argparse
    import random

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per call (median)")
    parser.add_argument("--sigma", type=float, default=0.0, help="lognormal sigma (0: fixed)")
    parser.add_argument(
        "--per-second",
        type=int,
        default=0,
        help="a provider's limit: 429 (Retry-After: 1) beyond this many requests in a second",
    )
    parser.add_argument("steps", nargs="+", help="e.g. tool:list_memory_blocks done")
    args = parser.parse_args()

    def step(spec: str) -> Reply:
        if not spec.startswith("tool:"):
            return text(spec)
        name, _, arguments = spec[5:].partition(":")
        return call(name, **(json.loads(arguments) if arguments else {}))

    steps = [step(spec) for spec in args.steps]
    rng = random.Random(42)
    recent: list[float] = []
    limit_lock = threading.Lock()

    def over_limit() -> bool:
        now = time.monotonic()
        with limit_lock:
            recent[:] = [t for t in recent if t > now - 1.0]
            if len(recent) >= args.per_second:
                return True
            recent.append(now)
            return False

    def respond(request: dict[str, Any]) -> Action:
        if args.per_second and over_limit():
            return Fail(429, "rate limit exceeded", headers={"retry-after": "1"})
        step = steps[min(turn_of(request), len(steps) - 1)]
        if args.latency <= 0:
            return step
        seconds = args.latency * (rng.lognormvariate(0, args.sigma) if args.sigma else 1.0)
        return Delay(seconds, step)

    server = ModelServer(respond)
    if args.port:
        server.port = args.port
        server._server.config.port = args.port  # pyright: ignore[reportPrivateUsage]
    server.start()
    print(server.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    _main()
