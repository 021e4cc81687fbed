"""The composition root: builds every store and service from settings, once per app or command."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.agents.models import ModelFactory
from ralph.background.executor import Executor
from ralph.background.queue import ArqDispatcher, connect
from ralph.background.registry import TaskRegistry
from ralph.background.schedule_store import ScheduleStore
from ralph.background.scheduler import Scheduler
from ralph.background.store import RunStore, TaskStore
from ralph.chat import ChatService
from ralph.clock import Clock, SystemClock
from ralph.config import Settings
from ralph.conversations.store import ConversationStore
from ralph.db import migrate
from ralph.db.engine import create_engine, create_probe_engine
from ralph.memory.service import MemoryService
from ralph.memory.store import MemoryStore


@dataclass
class Services:
    """Everything a request handler, CLI command or worker needs, built for one settings object."""

    settings: Settings
    clock: Clock
    engine: AsyncEngine
    # health probes only: its own connections, never queued behind the stores' work
    probe_engine: AsyncEngine
    memory: MemoryService
    conversations: ConversationStore
    models: ModelFactory
    chat: ChatService
    registry: TaskRegistry
    runs: RunStore
    executor: Executor
    scheduler: Scheduler


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    apply_migrations: bool = True,
    models: ModelFactory | None = None,
    role: Literal["server", "worker"] = "server",
) -> AsyncGenerator[Services]:
    """Open the database (migrating it to head unless told not to), yield the services, close.

    A `worker` executes units handed to it (and watches for cancels); a `server` in ARQ mode
    hands its units to workers through Redis.
    """
    # in the worker mode every server and worker shares one limit, through Redis
    shared_limit = role == "worker" or settings.worker_mode == "arq"
    models = models or ModelFactory(settings, shared_limit=shared_limit)
    engine = create_engine(settings.effective_database_url)
    probe_engine = create_probe_engine(settings.effective_database_url)
    stack = AsyncExitStack()
    try:
        if apply_migrations:
            await migrate.upgrade(engine)
        clock = clock or SystemClock()
        memory_store = MemoryStore(engine)
        memory = MemoryService(memory_store, clock, settings.memory_max_body_bytes)
        conversations = ConversationStore(engine)
        runs = RunStore(engine)
        dispatcher: ArqDispatcher | None = None
        if role == "server" and settings.worker_mode == "arq":
            dispatcher = ArqDispatcher(
                await connect(settings),
                runs,
                clock,
                settings.queue_name,
                heartbeat_seconds=settings.worker_heartbeat_seconds,
            )
            stack.push_async_callback(dispatcher.aclose)
        executor = Executor(
            runs=runs,
            memory=memory,
            conversations=conversations,
            models=models,
            clock=clock,
            data_dir=settings.data_dir,
            allow_shell=settings.allow_shell_tools,
            transcript_max_chars=settings.agent_transcript_max_chars,
            dispatch=dispatcher,
            cancel_poll_seconds=settings.worker_cancel_poll_seconds if role == "worker" else None,
            rerun_limit=settings.rerun_interrupted_users,
        )
        registry = TaskRegistry(TaskStore(engine), clock, allow_shell=settings.allow_shell_tools)
        yield Services(
            settings=settings,
            clock=clock,
            engine=engine,
            probe_engine=probe_engine,
            memory=memory,
            conversations=conversations,
            models=models,
            chat=ChatService(
                memory=memory,
                conversations=conversations,
                models=models,
                clock=clock,
                data_dir=settings.data_dir,
                max_turns=settings.chat_max_turns,
                timeout=settings.model_timeout_seconds * 2,
            ),
            registry=registry,
            runs=runs,
            executor=executor,
            scheduler=Scheduler(
                store=ScheduleStore(engine),
                registry=registry,
                executor=executor,
                clock=clock,
                idle_interval_seconds=settings.idle_check_seconds,
                lease_seconds=settings.run_lease_seconds,
                units_alive=dispatcher.alive_users if dispatcher is not None else None,
            ),
        )
    finally:
        await stack.aclose()
        await engine.dispose()
        await probe_engine.dispose()
        await models.aclose()
