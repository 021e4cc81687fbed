"""`create_app(settings)`: the FastAPI application and its lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import structlog
from fastapi import Depends, FastAPI

from ralph import __version__
from ralph.aio import cancel_and_wait
from ralph.api import (
    background,
    chat,
    conversations,
    health,
    memory,
    metrics,
    proposals,
    users,
)
from ralph.api.deps import bearer_token
from ralph.api.errors import ERROR_RESPONSES, install_error_handlers
from ralph.api.middleware import (
    AccessMiddleware,
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
    UnicodeGuardMiddleware,
)
from ralph.background.taskfile import read_tasks_file
from ralph.clock import Clock, SystemClock
from ralph.composition import Services, open_services
from ralph.config import Settings
from ralph.console.routes import console_sessions, mount_console

log = structlog.get_logger(__name__)

# the interactive docs and the document they read
API_DOCS = ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


async def _sync_messages(services: Services, settings: Settings) -> None:
    """Send Honcho the messages kept while it was away, every RALPH_HONCHO_SYNC_SECONDS."""
    while True:
        try:
            sent = await services.conversations.sync()
            if sent:
                log.info("honcho_synced", messages=sent)
        except Exception:  # the database away: the next round tries again
            log.exception("honcho_sync_failed")
        await asyncio.sleep(settings.honcho_sync_seconds)


def _origin(url: str) -> str:
    """The origin (scheme://host[:port]) of a URL, as a browser sends it in `Origin`."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def create_app(settings: Settings, *, clock: Clock | None = None) -> FastAPI:
    """Build an app for `settings`. Each app owns its engine and services: nothing is global."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncGenerator[None]:
        async with open_services(settings, clock=clock) as services:
            services.models.warn_if_dev()
            app.state.services = services
            if settings.tasks_file is not None:
                tasks = read_tasks_file(settings.tasks_file)
                for change in await services.background.apply(tasks):
                    log.info("task_file_applied", task=change.name, action=change.action)
            if settings.scheduler_enabled:
                services.scheduler.start()
            if services.webhooks is not None:
                services.webhooks.start()
            syncing: asyncio.Task[None] | None = None
            if services.conversations.archived:
                syncing = asyncio.create_task(_sync_messages(services, settings))
            try:
                yield
            finally:
                await cancel_and_wait(syncing)
                await services.scheduler.stop()
                await services.coordinator.shutdown(settings.shutdown_grace_seconds)
                if services.webhooks is not None:
                    # after the runs: their last events are in the outbox (sent next start)
                    await services.webhooks.stop()

    app = FastAPI(
        title="Ralph",
        version=__version__,
        description=(
            "Agents that keep a memory of each user and work for them in the background. "
            "When RALPH_API_TOKEN is set, every route except /health (and these docs, if "
            "RALPH_API_DOCS_PUBLIC=true) needs `Authorization: Bearer <RALPH_API_TOKEN>`. "
            "Every error is JSON with a `detail` string."
        ),
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # the last added runs first: request id, token, size cap, then the body's text
    app.add_middleware(UnicodeGuardMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    public = {
        "/",  # the address `make run` prints: a redirect to the console, which asks for a token
        "/health",
        "/console/login",
        *(API_DOCS if settings.api_docs_public else ()),
        *(["/metrics"] if settings.metrics_public else ()),
    }
    sessions = console_sessions(settings, clock or SystemClock())
    app.state.console_sessions = sessions
    app.add_middleware(
        AccessMiddleware,
        sessions=sessions,
        public=public,
        public_prefixes=("/console/static/",),
        own_origins=[_origin(settings.public_url)] if settings.public_url else [],
    )
    app.add_middleware(RequestIdMiddleware)

    app.include_router(health.router)
    for router in (
        memory.router,
        memory.log_router,
        proposals.router,
        conversations.router,
        chat.router,
        background.router,
        users.router,
        metrics.router,
    ):
        app.include_router(router, dependencies=[Depends(bearer_token)], responses=ERROR_RESPONSES)
    mount_console(app, settings)
    return app
