"""The composition root: builds every store and service from settings, once per app or command."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from ralph.agents.kit import AgentKit
from ralph.agents.models import ModelFactory
from ralph.background.agent_process import AgentProcess
from ralph.background.chain_store import ChainStore
from ralph.background.coordinator import RunCoordinator
from ralph.background.dispatch import Dispatch
from ralph.background.inflight import InFlight
from ralph.background.queue import ArqDispatcher, connect
from ralph.background.registry import TaskRegistry
from ralph.background.run_store import RunStore
from ralph.background.schedule_store import ScheduleStore
from ralph.background.scheduler import Scheduler
from ralph.background.service import BackgroundService
from ralph.background.stats import StatsStore
from ralph.background.task_store import TaskStore
from ralph.background.units import UnitRunner
from ralph.chat.service import ChatService
from ralph.clock import Clock, SystemClock
from ralph.config import Settings
from ralph.console.session_store import RevokedSessions
from ralph.conversations.honcho import HonchoArchive
from ralph.conversations.service import ConversationService
from ralph.conversations.store import ConversationStore
from ralph.db import migrate
from ralph.db.engine import create_engine, create_probe_engine, create_read_engine
from ralph.memory.service import MemoryService
from ralph.memory.store import MemoryStore
from ralph.memory.versioning import DoltVersioning
from ralph.observability.service import MetricsService
from ralph.observability.store import MetricsStore
from ralph.users.service import UserService
from ralph.users.store import ProfileStore
from ralph.webhooks.sender import WebhookSender
from ralph.webhooks.store import Outbox


def _sweeps(settings: Settings, memory: MemoryService) -> list[Callable[[], Awaitable[object]]]:
    """What the scheduler does once a pass besides firing tasks."""
    ttl = settings.proposal_ttl_days
    if ttl is None:
        return []
    return [lambda: memory.expire_pending(ttl)]


@dataclass
class Services:
    """Everything a request handler, CLI command or worker needs, built for one settings object."""

    settings: Settings
    clock: Clock
    engine: AsyncEngine
    # health probes only: its own connections, never queued behind the stores' work
    probe_engine: AsyncEngine
    memory: MemoryService
    conversations: ConversationService
    users: UserService
    metrics: MetricsService
    # delivers webhook events (a server with RALPH_WEBHOOK_URL set; started by the app)
    webhooks: WebhookSender | None
    models: ModelFactory
    chat: ChatService
    registry: TaskRegistry
    runs: RunStore
    # executes units in this process: the `inprocess` mode's dispatch, a worker's whole job
    units: UnitRunner
    coordinator: RunCoordinator
    scheduler: Scheduler
    background: BackgroundService
    # console sessions ended by logging out
    revoked_sessions: RevokedSessions

    async def schema_status(self) -> tuple[str, str | None, str]:
        """(database: "ok" or why not, its schema revision, the revision this code needs),
        over the probe engine."""
        head = migrate.head_revision()
        try:
            # reading the schema version is the round trip that proves the database answers
            current = await migrate.current_revision(self.probe_engine)
        except Exception as exc:  # any driver error means "unreachable" to a health probe
            return f"unreachable: {type(exc).__name__}", None, head
        return "ok", current, head


@asynccontextmanager
async def open_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    apply_migrations: bool = True,
    models: ModelFactory | None = None,
    role: Literal["server", "worker", "agents"] = "server",
    engine: AsyncEngine | None = None,
) -> AsyncGenerator[Services]:
    """Open the database (migrating it to head unless told not to), yield the services, close.

    A `worker` (ARQ) or `agents` (a server's agent process) executes the units handed to it;
    a `server` hands its units to where its `RALPH_WORKER_MODE` says. With `engine` given, the
    services use it (and leave it open) instead of opening one for the settings' database.
    """
    # in the ARQ mode every server and worker shares one limit, through Redis
    shared_limit = role == "worker" or settings.worker_mode == "arq"
    models = models or ModelFactory(settings, shared_limit=shared_limit)
    own_engine = engine is None
    engine = engine or create_engine(settings.effective_database_url)
    probe_engine = create_probe_engine(settings.effective_database_url)
    read_engine = create_read_engine(settings.effective_database_url)
    stack = AsyncExitStack()
    try:
        if apply_migrations:
            await migrate.upgrade(engine)
        clock = clock or SystemClock()
        outbox = Outbox(
            enabled=settings.webhook_url is not None,
            console_url=f"{settings.public_url or ''}/console",
        )
        versioning: DoltVersioning | None = None
        if settings.memory_versioning == "dolt":
            versioning = DoltVersioning(engine)
            await versioning.check(engine)
        memory_store = MemoryStore(engine, read_engine, outbox, versioning)
        memory = MemoryService(
            memory_store,
            clock,
            settings.memory_max_body_bytes,
            remember_days=settings.rejections_remembered_days,
        )
        archive: HonchoArchive | None = None
        if settings.messages_backend == "honcho" and settings.honcho_url is not None:
            key = settings.honcho_api_key
            archive = HonchoArchive(
                settings.honcho_url,
                settings.honcho_workspace,
                api_key=key.get_secret_value() if key else None,
                timeout_seconds=settings.honcho_timeout_seconds,
                assistant_peer=settings.honcho_assistant_peer,
            )
        conversation_store = ConversationStore(engine, read_engine)
        stack.push_async_callback(conversation_store.aclose)
        conversations = ConversationService(conversation_store, clock, archive)
        runs = RunStore(engine, read_engine, outbox)
        chains = ChainStore(engine, runs, read_engine)
        kit = AgentKit(memory, conversations, models, settings.data_dir, settings.allow_shell_tools)
        units = UnitRunner(
            runs=runs,
            chains=chains,
            kit=kit,
            clock=clock,
            inflight=InFlight(),
            transcript_max_chars=settings.agent_transcript_max_chars,
        )
        dispatch: Dispatch = units
        # units run here share the coordinator's cancel marks and token counters
        inflight = units.inflight
        arq: ArqDispatcher | None = None
        if role == "server" and settings.worker_mode == "arq":
            arq = ArqDispatcher(
                await connect(settings),
                runs,
                clock,
                settings.queue_name,
                heartbeat_seconds=settings.worker_heartbeat_seconds,
            )
            stack.push_async_callback(arq.aclose)
            dispatch, inflight = arq, InFlight()
        elif role == "server" and settings.worker_mode == "subprocess":
            inflight = InFlight()
            child = AgentProcess(settings, runs, clock, inflight, models.limiter)
            stack.push_async_callback(child.aclose)
            await child.start()
            dispatch = child
        coordinator = RunCoordinator(
            runs=runs,
            dispatch=dispatch,
            inflight=inflight,
            clock=clock,
            rerun_limit=settings.rerun_interrupted_users,
        )
        tasks = TaskStore(engine, read_engine)
        registry = TaskRegistry(tasks, clock, allow_shell=settings.allow_shell_tools)
        profiles = ProfileStore(engine, read_engine)
        users = UserService(profiles, clock)
        scheduler = Scheduler(
            store=ScheduleStore(engine, runs, tasks, read_engine),
            runs=runs,
            chains=chains,
            profiles=profiles,
            registry=registry,
            coordinator=coordinator,
            clock=clock,
            idle_interval_seconds=settings.idle_check_seconds,
            lease_seconds=settings.run_lease_seconds,
            units_alive=arq.alive_users if arq is not None else None,
            sweeps=_sweeps(settings, memory),
        )
        metrics = MetricsService(MetricsStore(read_engine or engine), clock)
        webhooks: WebhookSender | None = None
        if role == "server" and settings.webhook_url is not None:
            secret = settings.webhook_secret
            webhooks = WebhookSender(
                engine,
                clock,
                settings.webhook_url,
                secret=secret.get_secret_value() if secret else None,
                retry_base_seconds=settings.webhook_retry_seconds,
                poll_seconds=settings.webhook_poll_seconds,
            )
            outbox.on_added(webhooks.wake)
        conversations.on_activity(scheduler.note_activity)
        coordinator.on_unit_end = scheduler.note_result
        users.on_change(scheduler.wake)
        yield Services(
            settings=settings,
            clock=clock,
            engine=engine,
            probe_engine=probe_engine,
            memory=memory,
            conversations=conversations,
            users=users,
            metrics=metrics,
            webhooks=webhooks,
            models=models,
            chat=ChatService(
                kit,
                clock,
                max_turns=settings.chat_max_turns,
                timeout=settings.model_timeout_seconds * 2,
            ),
            registry=registry,
            runs=runs,
            units=units,
            coordinator=coordinator,
            scheduler=scheduler,
            background=BackgroundService(
                registry=registry,
                runs=runs,
                coordinator=coordinator,
                scheduler=scheduler,
                chains=chains,
                stats=StatsStore(read_engine or engine),
                clock=clock,
            ),
            revoked_sessions=RevokedSessions(engine),
        )
    finally:
        await stack.aclose()
        if own_engine:
            await engine.dispose()
        await probe_engine.dispose()
        if read_engine is not None:
            await read_engine.dispose()
        await models.aclose()
