"""Tasks as files: a TOML document with one `[tasks.NAME]` table per task, the same fields as
the API (`name` comes from the table's key). Read with the standard library's `tomllib`,
written with `tomli-w`."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from ralph.background.models import TaskDefinition


class TaskFileError(ValueError):
    """A file that cannot be applied; the message names the file, the task and the field."""


def parse_tasks(text: str, source: str) -> list[TaskDefinition]:
    """Every task `text` defines, checked as the API checks them; TaskFileError listing every
    problem found (nothing is half-read)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskFileError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"tasks"})
    if unknown:
        raise TaskFileError(f"{source}: unknown top-level keys {unknown}: use [tasks.NAME]")
    tables: dict[str, Any] = document.get("tasks", {})
    problems: list[str] = []
    tasks: list[TaskDefinition] = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            problems.append(f"{source}: task '{name}': must be a table ([tasks.{name}])")
            continue
        if "name" in table:
            problems.append(f"{source}: task '{name}': name: comes from the table's key")
            continue
        try:
            tasks.append(TaskDefinition.model_validate({**table, "name": name}))
        except ValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"]) or "(task)"
                problems.append(f"{source}: task '{name}': {field}: {error['msg']}")
    if problems:
        raise TaskFileError("\n".join(problems))
    return tasks


def read_tasks_file(path: Path) -> list[TaskDefinition]:
    """`parse_tasks` of a file; TaskFileError if it cannot be read."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TaskFileError(f"{path}: cannot read: {exc}") from None
    return parse_tasks(text, str(path))


def dump_tasks(tasks: Sequence[TaskDefinition]) -> str:
    """`tasks` as a document `parse_tasks` reads back to the same definitions (unset
    optional fields are left out: TOML has no null)."""
    tables = {
        task.name: task.model_dump(mode="json", exclude={"name"}, exclude_none=True)
        for task in tasks
    }
    return tomli_w.dumps({"tasks": tables})
