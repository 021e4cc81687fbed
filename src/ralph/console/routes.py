"""The console (`/console`): server-rendered pages (Jinja2) for the people who review and
operate, refreshed in place by HTMX (vendored: the console works offline).

Pages only read. Every action a page offers (approve, reject, bulk decisions, revert, enable,
run now) is the documented API call, made by the page's script with the session cookie and
its CSRF header: what a person does here, a script can do with the token.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from ralph import __version__
from ralph.api.deps import ServicesDep, request_role
from ralph.api.params import LabelQuery, TaskNamePath, TaskQuery, UserIdPath, UserIdQuery
from ralph.background.models import (
    FINISHED_RUN,
    Attempt,
    UserResult,
    UserStatus,
)
from ralph.background.stats import OUTCOMES
from ralph.background.triggers.after import followers
from ralph.clock import Clock
from ralph.composition import Services
from ralph.config import Settings
from ralph.console.charts import COLOURS, proposals_chart, tokens_chart
from ralph.console.diff import DiffLine, diff_lines
from ralph.console.sessions import (
    COOKIE,
    FULL,
    LIFETIME,
    REVIEWER,
    Sessions,
    named_reviewer,
    signature_of,
)
from ralph.conversations.service import Cited
from ralph.errors import NotFound
from ralph.memory.models import Proposal, ProposalStatus

HERE = Path(__file__).parent
PAGE_SIZE = 50

# characters that reorder the text around them (U+202E shows "evil" as "live"): a reviewer
# sees each as a visible mark instead, in whatever the console shows
_BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(value: object) -> object:
    """Every printed value, with direction controls shown as [U+XXXX] (Markup stays Markup:
    the mark holds nothing HTML would read)."""
    if isinstance(value, str) and _BIDI_CONTROLS.search(value):
        marked = _BIDI_CONTROLS.sub(lambda m: f"[U+{ord(m.group()):04X}]", value)
        return Markup(marked) if isinstance(value, Markup) else marked
    return value


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    finalize=_visible,
)
router = APIRouter(include_in_schema=False)


def console_sessions(settings: Settings, clock: Clock) -> Sessions | None:
    """Sessions for the configured tokens; None without any (the console opens directly)."""
    tokens: dict[str, str] = {}
    if settings.api_token is not None:
        tokens[FULL] = settings.api_token.get_secret_value()
    if settings.reviewer_token is not None:
        tokens[REVIEWER] = settings.reviewer_token.get_secret_value()
    for name, token in settings.reviewers.items():
        tokens[named_reviewer(name)] = token.get_secret_value()
    return Sessions(tokens, clock.now, settings.auth_failures_per_minute) if tokens else None


def mount_console(app: FastAPI, settings: Settings) -> None:
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
    app.include_router(router)
    app.state.console_secure_cookie = (settings.public_url or "").startswith("https://")


def _render(request: Request, template: str, **context: Any) -> HTMLResponse:
    session = request.cookies.get(COOKIE)
    sessions: Sessions | None = request.app.state.console_sessions
    role = request_role(request)
    csrf = sessions.csrf(session) if sessions is not None and session else ""
    html = templates.get_template(template).render(
        request=request,
        role=role,
        can_operate=role == FULL,
        csrf=csrf,
        logged_in=sessions is not None,
        version=__version__,
        **context,
    )
    return HTMLResponse(html)


# --- review queue ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueItem:
    proposal: Proposal
    lines: list[DiffLine]
    conflict: str | None
    cited: list[Cited]


async def _queue(services: Services, filters: dict[str, str | None]) -> list[QueueItem]:
    pending = await services.memory.list_proposals(
        filters["user_id"],
        status=ProposalStatus.PENDING,
        limit=PAGE_SIZE,
        run_id=filters["run_id"],
        label=filters["label"],
        task=filters["task"],
    )
    items: list[QueueItem] = []
    previews = await services.memory.previews(pending)
    cited = await services.conversations.cited(
        [(p.user_id, p.evidence.messages if p.evidence else ()) for p in pending]
    )
    for proposal, (current, proposed, conflict), based_on in zip(
        pending, previews, cited, strict=True
    ):
        lines = diff_lines(current, proposed) if proposed is not None else []
        items.append(QueueItem(proposal, lines, conflict, based_on))
    return items


RunIdQuery = Annotated[str | None, Query(max_length=36)]


def _queue_filters(
    task: TaskQuery = None,
    run_id: RunIdQuery = None,
    user_id: UserIdQuery = None,
    label: LabelQuery = None,
) -> dict[str, str | None]:
    """The queue's filters, as the page and its refreshes take them from the query."""
    return {"task": task, "run_id": run_id, "user_id": user_id, "label": label}


QueueFilters = Annotated[dict[str, str | None], Depends(_queue_filters)]


@router.get("/")
async def root() -> RedirectResponse:
    """The server's own address (what `make run` prints) opens the console."""
    return RedirectResponse("/console", status_code=307)


@router.get("/console")
async def queue_page(
    request: Request, services: ServicesDep, filters: QueueFilters
) -> HTMLResponse:
    query = urlencode({k: v for k, v in filters.items() if v})
    items = await _queue(services, filters)
    failed: list[UserResult] = []
    if filters["run_id"]:
        # a run's review shows what it did not do too: its failed users
        with contextlib.suppress(NotFound):
            _, failed = await services.background.run(
                filters["run_id"], users_limit=500, users_status=UserStatus.FAILED
            )
    return _render(request, "queue.html", items=items, filters=filters, query=query, failed=failed)


@router.get("/console/queue")
async def queue_items(
    request: Request, services: ServicesDep, filters: QueueFilters
) -> HTMLResponse:
    """The queue's items alone: what the page polls to stay current without a reload."""
    items = await _queue(services, filters)
    return _render(request, "_queue_items.html", items=items)


# --- a user ------------------------------------------------------------------------------


@router.get("/console/users/{user_id}")
async def user_page(
    request: Request,
    services: ServicesDep,
    user_id: UserIdPath,
    label: LabelQuery = None,
    a: Annotated[int | None, Query(ge=1)] = None,
    b: Annotated[int | None, Query(ge=1)] = None,
) -> HTMLResponse:
    blocks = await services.memory.list_blocks(user_id)
    histories = {
        block.label: await services.memory.history(user_id, block.label) for block in blocks
    }
    compared: dict[str, Any] | None = None
    if label is not None and a is not None and b is not None:
        old = await services.memory.get_version(user_id, label, a)
        new = await services.memory.get_version(user_id, label, b)
        compared = {"label": label, "a": a, "b": b, "lines": diff_lines(old.body, new.body)}
    proposals = await services.memory.list_proposals(user_id, limit=50)
    runs = await services.background.runs_of_user(user_id)
    return _render(
        request,
        "user.html",
        user_id=user_id,
        blocks=blocks,
        histories=histories,
        compared=compared,
        proposals=proposals,
        runs=runs,
    )


# --- runs ----------------------------------------------------------------------------------


@router.get("/console/runs")
async def runs_page(
    request: Request, services: ServicesDep, task: TaskQuery = None
) -> HTMLResponse:
    names = (
        [task] if task else [stored.definition.name for stored in await services.registry.list()]
    )
    runs = {name: await services.background.runs(name, None, 20) for name in names}
    return _render(request, "runs.html", runs=runs, task=task)


@router.get("/console/runs/{run_id}")
async def run_page(request: Request, services: ServicesDep, run_id: str) -> HTMLResponse:
    run, users = await services.background.run(run_id, users_limit=500)
    made = await services.memory.list_proposals(None, run_id=run_id, limit=1000)
    pending = sum(p.status is ProposalStatus.PENDING for p in made)
    return _render(
        request,
        "run.html",
        run=run,
        users=users,
        proposals=len(made),
        pending=pending,
        finished=run.status in FINISHED_RUN,
        failed=run.counts.get(UserStatus.FAILED, 0),
    )


@router.get("/console/runs/{run_id}/users/{user_id}")
async def transcript_page(
    request: Request, services: ServicesDep, run_id: str, user_id: UserIdPath
) -> HTMLResponse:
    result = await services.background.run_user(run_id, user_id)
    attempts: list[tuple[Attempt, list[Any]]] = [
        (attempt, json.loads(attempt.transcript or "[]"))
        for attempt in await services.background.attempts(run_id, user_id)
    ]
    return _render(request, "transcript.html", run_id=run_id, result=result, attempts=attempts)


# --- tasks -----------------------------------------------------------------------------------


@router.get("/console/tasks")
async def tasks_page(request: Request, services: ServicesDep) -> HTMLResponse:
    tasks: list[dict[str, Any]] = []
    stored_tasks = await services.registry.list()
    definitions = {s.definition.name: s.definition for s in stored_tasks}
    for stored in stored_tasks:
        task = stored.definition
        upcoming = await services.background.upcoming(task.name, 3)
        week = await services.background.stats(task.name, 7)
        tasks.append(
            {
                "task": task,
                "trigger": task.trigger.summary,
                "upcoming": upcoming,
                "followed_by": followers(definitions, task.name),
                "approval_rate": week.approval_rate,
                "decided": week.proposals["approved"]
                + week.proposals["approved_with_edits"]
                + week.proposals["rejected"],
            }
        )
    return _render(request, "tasks.html", tasks=tasks)


@router.get("/console/tasks/{name}")
async def task_page(
    request: Request,
    services: ServicesDep,
    name: TaskNamePath,
    days: int = Query(default=30, ge=1, le=366),
) -> HTMLResponse:
    """A task's quality over its last `days` days: proposals by outcome and the approval
    rate per day, tokens per day, the blocks it edits; charts drawn on the server."""
    stored = await services.registry.get(name)
    stats = await services.background.stats(name, days)
    definitions = {s.definition.name: s.definition for s in await services.registry.list()}
    return _render(
        request,
        "task.html",
        task=stored.definition,
        stats=stats,
        days=days,
        outcomes=OUTCOMES,
        colours=COLOURS,
        proposals_chart=proposals_chart(stats.per_day),
        tokens_chart=tokens_chart(stats.per_day),
        followed_by=followers(definitions, name),
    )


# --- login -------------------------------------------------------------------------------------


@router.get("/console/login")
async def login_page(request: Request, next: str = "/console") -> Response:
    if request.app.state.console_sessions is None:
        return RedirectResponse("/console", status_code=303)
    return _render(request, "login.html", next=_local(next), error=None)


@router.post("/console/login")
async def login(request: Request) -> Response:
    """A form post of the token: answered with the session cookie, or the form again (401)."""
    sessions: Sessions | None = request.app.state.console_sessions
    if sessions is None:
        return RedirectResponse("/console", status_code=303)
    form = parse_qs((await request.body()).decode(errors="replace"))
    token = form.get("token", [""])[0]
    target = _local(form.get("next", ["/console"])[0])
    client = request.client.host if request.client else "unknown"
    wait = sessions.failures.wait_seconds(client)
    if wait is not None:
        error = f"Too many wrong tokens: try again in {math.ceil(wait)} s."
        page = _render(request, "login.html", next=target, error=error)
        page.status_code = 429
        page.headers["Retry-After"] = str(math.ceil(wait))
        return page
    role = sessions.role_of_token(token)
    if role is None:
        sessions.failures.failed(client)
        page = _render(request, "login.html", next=target, error="That token is not valid.")
        page.status_code = 401
        return page
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        sessions.issue(role),
        max_age=int(LIFETIME.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.app.state.console_secure_cookie,
        path="/",
    )
    return response


@router.post("/console/logout")
async def logout(request: Request) -> Response:
    """End the session: its cookie is deleted, and revoked (a copy of it no longer works)."""
    sessions: Sessions | None = request.app.state.console_sessions
    session = request.cookies.get(COOKIE)
    expires = sessions.expires_at(session) if sessions and session else None
    if session and expires is not None:
        services: Services = request.app.state.services
        await services.revoked_sessions.revoke(signature_of(session), expires, services.clock.now())
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _local(target: str) -> str:
    """Only this console's own pages as a place to go after login (no open redirect)."""
    return target if target.startswith("/console") and "//" not in target else "/console"
