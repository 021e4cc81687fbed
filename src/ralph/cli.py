"""The `ralph` command line."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Annotated

import typer

from ralph import __version__
from ralph.aio import freeze_startup_heap
from ralph.config import Settings, SettingsError, check_serve_settings, load_settings

app = typer.Typer(
    name="ralph",
    help="Ralph: agents that keep a memory of each user and work for them in the background.",
    no_args_is_help=True,
    add_completion=False,
)


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except SettingsError as exc:
        typer.echo(f"error: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None


def _register_subcommands() -> None:
    from ralph.cli_client import memory_app, proposals_app, runs_app, tasks_app, users_app

    app.add_typer(tasks_app, name="tasks")
    app.add_typer(runs_app, name="runs")
    app.add_typer(proposals_app, name="proposals")
    app.add_typer(users_app, name="users")
    app.add_typer(memory_app, name="memory")


_register_subcommands()


def _check_dolt(settings: Settings) -> None:
    """One clear line, before the server starts, when the database cannot version memory."""
    from ralph.db.engine import create_engine
    from ralph.memory.versioning import DoltUnavailable, DoltVersioning

    async def check() -> None:
        engine = create_engine(settings.effective_database_url)
        try:
            await DoltVersioning.check(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(check())
    except DoltUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default RALPH_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default RALPH_PORT).")] = None,
) -> None:
    """Run the HTTP API with its scheduler; applies pending migrations first."""
    import uvicorn

    from ralph.agents.local import local_model
    from ralph.agents.models import check_model_settings
    from ralph.api.connections import bounded_protocol
    from ralph.app import create_app
    from ralph.config import max_connections
    from ralph.logs import configure_logging

    settings = _settings(host=host, port=port)
    try:
        check_model_settings(settings)
        check_serve_settings(settings)
    except SettingsError as exc:
        typer.echo(f"error: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    if settings.tasks_file is not None:
        from ralph.background.taskfile import TaskFileError, read_tasks_file

        try:
            read_tasks_file(settings.tasks_file)
        except TaskFileError as exc:
            typer.echo(f"error: RALPH_TASKS_FILE: {exc}", err=True)
            raise typer.Exit(2) from None
    if settings.memory_versioning == "dolt":
        _check_dolt(settings)
    os.environ.setdefault("AGNO_TELEMETRY", "false")
    configure_logging(settings.log_level, settings.log_json)
    with local_model(settings) as settings:
        application = create_app(settings)
        freeze_startup_heap()
        uvicorn.run(
            application,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
            http=bounded_protocol(settings.http_header_timeout_seconds, max_connections(settings)),
        )


@app.command()
def worker() -> None:
    """Run an ARQ worker that executes background agents queued by servers in
    RALPH_WORKER_MODE=arq (same database, Redis at RALPH_REDIS_URL)."""
    import uvloop

    from ralph.agents.local import local_model
    from ralph.agents.models import check_model_settings
    from ralph.background.worker import build_worker
    from ralph.logs import configure_logging

    settings = _settings()
    try:
        check_model_settings(settings)
    except SettingsError as exc:
        typer.echo(f"error: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ.setdefault("AGNO_TELEMETRY", "false")
    configure_logging(settings.log_level, settings.log_json)
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        # this worker's agent figures (the database's figures are on the server's /metrics)
        start_http_server(settings.worker_metrics_port, addr=settings.host)
    with local_model(settings) as settings:
        # the same event loop as `ralph serve` (uvicorn uses uvloop when it is installed)
        asyncio.set_event_loop(uvloop.new_event_loop())
        arq_worker = build_worker(settings)
        freeze_startup_heap()
        arq_worker.run()


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    down: Annotated[bool, typer.Option("--down", help="Downgrade to REVISION instead.")] = False,
) -> None:
    """Apply database migrations (or roll them back with --down)."""
    from ralph.db import migrate as migrations
    from ralph.db.engine import create_engine

    settings = _settings()

    async def _run() -> str | None:
        engine = create_engine(settings.effective_database_url)
        try:
            if down:
                await migrations.downgrade(engine, revision)
            else:
                await migrations.upgrade(engine, revision)
            return await migrations.current_revision(engine)
        finally:
            await engine.dispose()

    current = asyncio.run(_run())
    typer.echo(f"database at revision {current or 'base (empty)'}")


@app.command(name="eval")
def evaluate(
    scenario: Annotated[
        str, typer.Argument(help="A scenario file (TOML), e.g. evals/learners.toml.")
    ],
    mode: Annotated[
        str | None, typer.Option(help="Run the task in this mode: agent or extract.")
    ] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Also run a bare Agno agent with one tool.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON, not tables.")] = False,
) -> None:
    """Run a task over a scenario's users against the configured model, in a throwaway
    database, and score the proposals against the facts their messages hold."""
    from pathlib import Path

    from ralph import evaluation
    from ralph.agents.local import local_model
    from ralph.agents.models import check_model_settings
    from ralph.logs import configure_logging

    if mode not in (None, "agent", "extract"):
        typer.echo("error: --mode is agent or extract", err=True)
        raise typer.Exit(2)
    settings = _settings()
    try:
        check_model_settings(settings)
        loaded = evaluation.read_scenario(Path(scenario), mode)
    except (SettingsError, evaluation.ScenarioError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    os.environ.setdefault("AGNO_TELEMETRY", "false")
    configure_logging("warning", settings.log_json)
    import logging

    # Agno logs its agents' errors to stdout: to stderr here, where the tables (or the JSON)
    # are not
    for handler in logging.getLogger("agno").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)  # pyright: ignore[reportUnknownMemberType]
    results: dict[str, list[evaluation.UserScore]] = {}
    with local_model(settings) as settings:
        if not as_json:
            model = f"{settings.model_provider or 'dev'} {settings.model_id or ''}".rstrip()
            typer.echo(f"model: {model}")
        runs = [(loaded.task.mode, evaluation.evaluate)]
        if baseline:
            runs.append(("baseline", evaluation.evaluate_baseline))
        for label, run in runs:
            results[label] = asyncio.run(run(loaded, settings))
            if not as_json:  # each table as soon as it is known: a run takes minutes
                typer.echo(evaluation.report(label, results[label]))
    if as_json:
        typer.echo(evaluation.as_json(results))


@app.command()
def version() -> None:
    """Print Ralph's version."""
    typer.echo(__version__)


def main() -> None:
    app(prog_name="ralph")


if __name__ == "__main__":
    main()
    sys.exit(0)
