"""The composition root: builds every store and service from settings, once per app or command."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.agents.models import ModelFactory
from ralph.chat import ChatService
from ralph.clock import Clock, SystemClock
from ralph.config import Settings
from ralph.conversations.store import ConversationStore
from ralph.db import migrate
from ralph.db.engine import create_engine
from ralph.memory.service import MemoryService
from ralph.memory.store import MemoryStore


@dataclass
class Services:
    """Everything a request handler, CLI command or worker needs, built for one settings object."""

    settings: Settings
    clock: Clock
    engine: AsyncEngine
    memory: MemoryService
    conversations: ConversationStore
    models: ModelFactory
    chat: ChatService


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    apply_migrations: bool = True,
    models: ModelFactory | None = None,
) -> AsyncGenerator[Services]:
    """Open the database (migrating it to head unless told not to), yield the services, close."""
    models = models or ModelFactory(settings)
    engine = create_engine(settings.effective_database_url)
    try:
        if apply_migrations:
            await migrate.upgrade(engine)
        clock = clock or SystemClock()
        memory = MemoryService(MemoryStore(engine), clock, settings.memory_max_body_bytes)
        conversations = ConversationStore(engine)
        yield Services(
            settings=settings,
            clock=clock,
            engine=engine,
            memory=memory,
            conversations=conversations,
            models=models,
            chat=ChatService(
                memory=memory,
                conversations=conversations,
                models=models,
                clock=clock,
                data_dir=settings.data_dir,
                timeout=settings.model_timeout_seconds * 2,
            ),
        )
    finally:
        await engine.dispose()
        await models.aclose()
