"""`ralph tasks ...`, `ralph runs ...` and `ralph proposals ...`: the API from the command
line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import TypeAdapter
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from ralph.background.models import STORED, TaskDefinition, Trigger
from ralph.background.taskfile import TaskFileError, dump_tasks, read_tasks_file
from ralph.config import load_settings

tasks_app = typer.Typer(help="Background task definitions (talks to a running server).")
runs_app = typer.Typer(help="Runs of background tasks (talks to a running server).")
proposals_app = typer.Typer(
    help="Review the memory edits agents proposed: list, show, approve, reject."
)
console = Console()

UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="Server URL (default http://RALPH_HOST:RALPH_PORT)."),
]

FINISHED = {"success", "failed", "partial", "cancelled", "interrupted", "missed"}


def _client(url: str | None) -> httpx.Client:
    settings = load_settings()
    base = url or f"http://{settings.host}:{settings.port}"
    headers: dict[str, str] = {}
    if settings.api_token is not None:
        headers["Authorization"] = f"Bearer {settings.api_token.get_secret_value()}"
    return httpx.Client(base_url=base, headers=headers, timeout=30)


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/red] cannot reach {client.base_url}: {escape(str(exc))}")
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        # the server's words may hold "[...]" (422 details do): print them, not as markup
        console.print(f"[red]error {response.status_code}:[/red] {escape(str(detail))}")
        raise typer.Exit(1)
    return response.json()


_TRIGGER: TypeAdapter[Trigger] = TypeAdapter(Trigger)


@tasks_app.command("list")
def tasks_list(url: UrlOption = None) -> None:
    """List tasks."""
    with _client(url) as client:
        tasks = _call(client, "GET", "/background/tasks")
    table = Table("name", "trigger", "users", "batch", "enabled")
    for task in tasks:
        trigger = _TRIGGER.validate_python(task["trigger"], context={STORED: True})
        table.add_row(
            task["name"],
            trigger.summary,
            str(len(task["user_ids"])),
            str(task["batch_size"]),
            "yes" if task["enabled"] else "no",
        )
    console.print(table)


def _show(url: str | None, path: str) -> None:
    """Print what GET `path` answers, as JSON."""
    with _client(url) as client:
        console.print_json(json.dumps(_call(client, "GET", path)))


@tasks_app.command("show")
def tasks_show(name: str, url: UrlOption = None) -> None:
    """Show one task as JSON."""
    _show(url, f"/background/tasks/{name}")


_OUTCOME_COLUMNS = (
    ("approved", "ok"),
    ("approved_with_edits", "edited"),
    ("rejected", "rejected"),
    ("superseded", "superseded"),
    ("expired", "expired"),
    ("pending", "pending"),
)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


@tasks_app.command("stats")
def tasks_stats(
    name: str,
    days: Annotated[int, typer.Option(help="How many days, up to today (UTC).")] = 30,
    url: UrlOption = None,
) -> None:
    """A task's quality per day: users by status, proposals by outcome, approval rate,
    tokens and cost."""
    with _client(url) as client:
        stats = _call(client, "GET", f"/background/tasks/{name}/stats", params={"days": days})
    table = Table(
        "day", "users", *(title for _, title in _OUTCOME_COLUMNS), "approval", "tokens", "cost"
    )
    for day in stats["per_day"]:
        users = ", ".join(f"{n} {status}" for status, n in sorted(day["users"].items()))
        cost = day["cost_usd"]
        table.add_row(
            day["day"],
            users or "-",
            *(str(day["proposals"].get(key, 0)) for key, _ in _OUTCOME_COLUMNS),
            _rate(day["approval_rate"]),
            f"{day['total_tokens']:,}",
            "-" if cost is None else f"${cost:.4f}",
        )
    console.print(table)
    by_label = ", ".join(f"{s['label']} {_rate(s['approval_rate'])}" for s in stats["per_label"])
    console.print(
        f"approval rate {_rate(stats['approval_rate'])} over {stats['days']} days; "
        f"tokens {stats['total_tokens']:,}" + (f"; by block: {by_label}" if by_label else "")
    )


@tasks_app.command("create")
def tasks_create(
    file: Annotated[Path, typer.Option("-f", "--file", help="Task definition (JSON).")],
    replace: Annotated[bool, typer.Option(help="Replace the task if it exists.")] = False,
    url: UrlOption = None,
) -> None:
    """Create (or with --replace, replace) a task from a JSON file."""
    try:
        body = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] cannot read {escape(str(file))}: {escape(str(exc))}")
        raise typer.Exit(1) from None
    with _client(url) as client:
        if replace:
            task = _call(client, "PUT", f"/background/tasks/{body.get('name')}", json=body)
        else:
            task = _call(client, "POST", "/background/tasks", json=body)
    console.print(f"task [bold]{task['name']}[/bold] saved")


@tasks_app.command("apply")
def tasks_apply(
    file: Annotated[Path, typer.Option("-f", "--file", help="Tasks file (TOML).")],
    prune: Annotated[
        bool, typer.Option("--prune", help="Delete the tasks the file does not define.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would change; change nothing.")
    ] = False,
    url: UrlOption = None,
) -> None:
    """Make the server's tasks match a file: create, update, leave unchanged (and with
    --prune delete). An invalid file applies nothing."""
    tasks = _read_tasks_file(file)
    body = {"tasks": [t.model_dump(mode="json") for t in tasks], "prune": prune}
    with _client(url) as client:
        changes = _call(client, "POST", "/background/tasks/apply", json=body | {"dry_run": dry_run})
    for change in changes:
        console.print(f"{change['action']:<10} {escape(change['name'])}")
    if dry_run:
        console.print("(dry run: nothing changed)")


@tasks_app.command("export")
def tasks_export(
    names: Annotated[
        list[str] | None, typer.Argument(help="Tasks to export (default all).")
    ] = None,
    url: UrlOption = None,
) -> None:
    """Print tasks as a file `ralph tasks apply -f` reads (TOML)."""
    with _client(url) as client:
        if names:
            found = [_call(client, "GET", f"/background/tasks/{name}") for name in names]
        else:
            found = _call(client, "GET", "/background/tasks")
    fields = set(TaskDefinition.model_fields)
    tasks = [
        TaskDefinition.model_validate({k: v for k, v in t.items() if k in fields}) for t in found
    ]
    typer.echo(dump_tasks(tasks), nl=False)


def _read_tasks_file(file: Path) -> list[TaskDefinition]:
    try:
        return read_tasks_file(file)
    except TaskFileError as exc:
        # one problem a line, as long as it is: the path and the field must stay whole
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        console.print("nothing applied")
        raise typer.Exit(1) from None


@tasks_app.command("run")
def tasks_run(
    name: str,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the run with a progress bar.")
    ] = False,
    user: Annotated[
        list[str] | None, typer.Option("--user", help="Only this user (repeat).")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Run the agents for real, print each user's proposed diffs, apply nothing "
            "(the proposals are previews). Waits for the run.",
        ),
    ] = False,
    url: UrlOption = None,
) -> None:
    """Start a run now; with --wait, follow it to the end."""
    with _client(url) as client:
        body: dict[str, Any] = {"dry_run": True} if dry_run else {}
        if user:
            body["user_ids"] = user
        started = _call(client, "POST", f"/background/tasks/{name}/run", json=body or None)
        run_id = started["run_id"]
        console.print(f"{'dry run' if dry_run else 'run'} {run_id} started")
        if not (wait or dry_run):
            return
        run = _follow(client, run_id)
        previews: list[dict[str, Any]] = []
        if dry_run:
            query = {"run_id": run_id, "status": "preview", "limit": 1000}
            previews = _call(client, "GET", "/proposals", params=query)
    for preview in sorted(previews, key=lambda p: (p["user_id"], p["created_at"])):
        console.rule(f"user {preview['user_id']}: block {preview['label']}", style="dim")
        console.print(f"reason: {preview['reason']}", markup=False)
        console.print(preview["diff"], markup=False, highlight=False)
    if dry_run:
        console.print(f"{len(previews)} proposed change(s), none applied")
    console.print(f"run {run_id}: [bold]{run['status']}[/bold] {run['counts']}")
    if run["status"] not in ("success",):
        raise typer.Exit(1)


def _follow(client: httpx.Client, run_id: str, interval: float = 0.5) -> dict[str, Any]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("users", total=None)
        while True:
            run: dict[str, Any] = _call(client, "GET", f"/background/runs/{run_id}?users_limit=0")
            counts: dict[str, int] = run["counts"]
            waiting = ("pending", "running", "retrying")
            done = sum(n for status, n in counts.items() if status not in waiting)
            progress.update(bar, total=run["user_total"], completed=done, description=run["status"])
            if run["status"] in FINISHED:
                return run
            time.sleep(interval)


@runs_app.command("list")
def runs_list(
    task: str,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    url: UrlOption = None,
) -> None:
    """List a task's runs."""
    with _client(url) as client:
        runs = _call(client, "GET", f"/background/tasks/{task}/runs", params={"limit": limit})
    table = Table(
        Column("run id", no_wrap=True), "trigger", "status", "users", "tokens", "cost", "created"
    )
    for run in runs:
        cost = run.get("cost_usd")
        table.add_row(
            run["id"],
            run["trigger_type"],
            run["status"],
            ", ".join(f"{k} {v}" for k, v in sorted(run["counts"].items())),
            str(run["total_tokens"]),
            "-" if cost is None else f"${cost:.4f}",
            run["created_at"],
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: str,
    user: Annotated[str | None, typer.Option(help="One user's result with transcript.")] = None,
    url: UrlOption = None,
) -> None:
    """Show a run (or one user's result in it) as JSON."""
    _show(url, f"/background/runs/{run_id}" + (f"/users/{user}" if user else ""))


@runs_app.command("retry")
def runs_retry(
    run_id: str,
    user: Annotated[
        list[str] | None,
        typer.Option("--user", help="Only this user (repeat); default: every failed user."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the new run to the end.")] = False,
    url: UrlOption = None,
) -> None:
    """Run a finished run's failed users again, in a new run."""
    with _client(url) as client:
        body = {"user_ids": user} if user else None
        started = _call(client, "POST", f"/background/runs/{run_id}/retry", json=body)
        retry_id = started["run_id"]
        console.print(f"retry {retry_id} of run {run_id} started")
        if not wait:
            return
        run = _follow(client, retry_id)
    console.print(f"run {retry_id}: [bold]{run['status']}[/bold] {run['counts']}")
    if run["status"] != "success":
        raise typer.Exit(1)


@proposals_app.command("list")
def proposals_list(
    user: Annotated[str | None, typer.Option(help="Only this user's.")] = None,
    status: Annotated[
        str, typer.Option(help="pending, approved, rejected, superseded, conflict or all.")
    ] = "pending",
    run: Annotated[str | None, typer.Option(help="Only those made by this run.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 50,
    url: UrlOption = None,
) -> None:
    """List proposals, newest first (default: everyone's pending ones, the review queue)."""
    params: dict[str, Any] = {"limit": limit}
    if status != "all":
        params["status"] = status
    if run:
        params["run_id"] = run
    path = f"/users/{user}/proposals" if user else "/proposals"
    with _client(url) as client:
        found = _call(client, "GET", path, params=params)
    table = Table(Column("id", no_wrap=True), "user", "block", "status", "author", "reason")
    for proposal in found:
        # Text, not str: a reason written by a model may hold "[...]", which rich reads as markup
        table.add_row(
            *(
                Text(str(proposal[key]))
                for key in ("id", "user_id", "label", "status", "author", "reason")
            )
        )
    console.print(table)


@proposals_app.command("show")
def proposals_show(proposal_id: str, url: UrlOption = None) -> None:
    """Show a proposal and the diff it would apply."""
    with _client(url) as client:
        proposal = _call(client, "GET", f"/proposals/{proposal_id}")
    _print_proposal(proposal)


def _print_proposal(proposal: dict[str, Any]) -> None:
    console.print(
        f"{proposal['id']}  user {proposal['user_id']}  block {proposal['label']}  "
        f"{proposal['status']}  by {proposal['author']}",
        markup=False,
    )
    console.print(f"reason: {proposal['reason']}", markup=False)
    if proposal.get("comment"):
        console.print(f"comment: {proposal['comment']}", markup=False)
    console.print(proposal["diff"], markup=False, highlight=False)


def _decide(proposal_id: str, verb: str, comment: str | None, url: str | None) -> None:
    with _client(url) as client:
        proposal = _call(
            client, "POST", f"/proposals/{proposal_id}/{verb}", json={"comment": comment}
        )
    _print_proposal(proposal)


CommentOption = Annotated[str | None, typer.Option(help="Why, kept with the decision.")]


RunOption = Annotated[
    str | None, typer.Option("--run", help="Every pending proposal of this run, instead of ID.")
]


def _decide_run(run_id: str, verb: str, comment: str | None, url: str | None) -> None:
    with _client(url) as client:
        body = {"run_id": run_id, "comment": comment}
        results: list[dict[str, Any]] = _call(client, "POST", f"/proposals/{verb}", json=body)
    for result in results:
        note = "" if result["decided"] else f"  ({result['error']})"
        console.print(f"{result['id']}  {result['status']}{note}", markup=False)
    failed = sum(1 for r in results if not r["decided"])
    console.print(f"{len(results) - failed} of {len(results)} {verb}d")
    if failed:
        raise typer.Exit(1)


def _decide_one_or_run(
    proposal_id: str | None, run: str | None, verb: str, comment: str | None, url: str | None
) -> None:
    if (proposal_id is None) == (run is None):
        console.print("[red]error:[/red] give a proposal ID or --run RUN_ID (not both)")
        raise typer.Exit(2)
    if run is not None:
        _decide_run(run, verb, comment, url)
    else:
        assert proposal_id is not None
        _decide(proposal_id, verb, comment, url)


@proposals_app.command("approve")
def proposals_approve(
    proposal_id: Annotated[str | None, typer.Argument()] = None,
    run: RunOption = None,
    comment: CommentOption = None,
    url: UrlOption = None,
) -> None:
    """Apply the proposal (or each pending one of a run) as the block's next version."""
    _decide_one_or_run(proposal_id, run, "approve", comment, url)


@proposals_app.command("reject")
def proposals_reject(
    proposal_id: Annotated[str | None, typer.Argument()] = None,
    run: RunOption = None,
    comment: CommentOption = None,
    url: UrlOption = None,
) -> None:
    """Reject the proposal (or each pending one of a run): the block stays as it is."""
    _decide_one_or_run(proposal_id, run, "reject", comment, url)


users_app = typer.Typer(help="User profiles: timezone and metadata (talks to a running server).")


@users_app.command("show")
def users_show(user_id: str, url: UrlOption = None) -> None:
    """Show a user's profile as JSON."""
    _show(url, f"/users/{user_id}")


@users_app.command("set")
def users_set(
    user_id: str,
    timezone: Annotated[
        str | None, typer.Option(help="IANA timezone, e.g. Europe/Berlin; 'none' clears it.")
    ] = None,
    metadata: Annotated[
        str | None, typer.Option(help="A JSON object replacing the metadata.")
    ] = None,
    url: UrlOption = None,
) -> None:
    """Change a user's profile: only the fields given; the others stay as they are."""
    with _client(url) as client:
        profile = _call(client, "GET", f"/users/{user_id}")
        body = {"timezone": profile["timezone"], "metadata": profile["metadata"]}
        if timezone is not None:
            body["timezone"] = None if timezone.lower() == "none" else timezone
        if metadata is not None:
            try:
                body["metadata"] = json.loads(metadata)
            except ValueError as exc:
                console.print(f"[red]error:[/red] --metadata is not JSON: {escape(str(exc))}")
                raise typer.Exit(1) from None
        updated = _call(client, "PUT", f"/users/{user_id}", json=body)
    console.print_json(json.dumps(updated))


memory_app = typer.Typer(help="Memory blocks (talks to a running server).")


@memory_app.command("log")
def memory_log(
    user_id: str,
    label: Annotated[str | None, typer.Argument(help="Only this block's commits.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    url: UrlOption = None,
) -> None:
    """The Dolt commits of a user's memory, newest first (RALPH_MEMORY_VERSIONING=dolt), as
    `dolt log` prints them."""
    params: dict[str, Any] = {"limit": limit}
    if label is not None:
        params["label"] = label
    with _client(url) as client:
        commits = _call(client, "GET", f"/users/{user_id}/memory/log", params=params)
    for commit in commits:
        typer.echo(f"commit {commit['hash']}")
        typer.echo(f"Author: {commit['author']} <{commit['email']}>")
        typer.echo(f"Date:   {commit['date']}\n")
        for line in commit["message"].splitlines():
            typer.echo(f"    {line}".rstrip())
        typer.echo()
