"""`create_app(settings)`: the FastAPI application and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from ralph import __version__
from ralph.api import background, chat, conversations, health, memory, proposals
from ralph.api.deps import require_token
from ralph.api.errors import install_error_handlers
from ralph.api.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from ralph.clock import Clock
from ralph.config import Settings
from ralph.services import open_services


def create_app(settings: Settings, *, clock: Clock | None = None) -> FastAPI:
    """Build an app for `settings`. Each app owns its engine and services: nothing is global."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        async with open_services(settings, clock=clock) as services:
            services.models.warn_if_dev()
            app.state.services = services
            if settings.scheduler_enabled:
                services.scheduler.start()
            try:
                yield
            finally:
                await services.scheduler.stop()
                await services.executor.shutdown(settings.shutdown_grace_seconds)

    app = FastAPI(
        title="Ralph",
        version=__version__,
        description=(
            "Agents that keep a memory of each user and work for them in the background. "
            "Every route except /health needs `Authorization: Bearer <RALPH_API_TOKEN>` "
            "when a token is configured."
        ),
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(RequestIdMiddleware)

    app.include_router(health.router)
    protected = [Depends(require_token)]
    for router in (
        memory.router,
        proposals.router,
        conversations.router,
        chat.router,
        background.router,
    ):
        app.include_router(router, dependencies=protected)
    return app
