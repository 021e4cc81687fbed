"""The layout the README describes, checked on the source: no import cycle, routers that reach
the database only through services, and one store module writing each table."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from ralph.db.tables import metadata

SRC = Path(__file__).parent.parent / "src"
PACKAGE = SRC / "ralph"
# statement builders whose first table argument is written
WRITERS = {"insert", "update", "delete", "insert_ignore", "upsert", "insert_rows"}


def modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue  # revisions create and alter tables: they are the schema's history
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(), str(path))


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(tree: ast.Module) -> set[str]:
    """Every module imported anywhere in `tree` (functions included), but under
    `if TYPE_CHECKING:`."""
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if is_module(candidate) else node.module)
    return found


def test_no_import_cycle() -> None:
    graph = {
        name: {i for i in imports(tree) if i.startswith("ralph.") and i != name}
        for name, tree in modules()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, set())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_routers_reach_the_database_only_through_services() -> None:
    offending = {
        name: sorted(
            i
            for i in imports(tree)
            if i.startswith(("sqlalchemy", "ralph.db"))
            or i.rsplit(".", 1)[-1] in {"store", "run_store", "task_store", "schedule_store"}
        )
        for name, tree in modules()
        if name.startswith("ralph.api.")
    }
    assert {name: found for name, found in offending.items() if found} == {}


def written_tables(tree: ast.Module) -> set[str]:
    tables = set(metadata.tables)
    written: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in WRITERS:
            written.update(a.id for a in node.args if isinstance(a, ast.Name) and a.id in tables)
        elif (
            isinstance(func, ast.Attribute)
            and func.attr in {"insert", "update", "delete"}
            and isinstance(func.value, ast.Name)
            and func.value.id in tables
        ):
            written.add(func.value.id)
    return written


def test_each_table_is_written_by_one_store_module() -> None:
    writers: dict[str, set[str]] = {}
    for name, tree in modules():
        for table in written_tables(tree):
            writers.setdefault(table, set()).add(name)
    assert {t: sorted(m) for t, m in writers.items() if len(m) > 1} == {}
    assert all(m.endswith("store") for owners in writers.values() for m in owners), writers
    # the check sees the writes it is meant to see
    assert writers["task_run_users"] == {"ralph.background.run_store"}
    assert set(writers) == set(metadata.tables) - {"alembic_version"}


def sets_status(node: ast.AST) -> bool:
    """Whether `node` holds a `status=` keyword or a `"status"` key."""
    return any(
        (isinstance(n, ast.keyword) and n.arg == "status")
        or (
            isinstance(n, ast.Dict)
            and any(isinstance(k, ast.Constant) and k.value == "status" for k in n.keys)
        )
        for n in ast.walk(node)
    )


def status_writers(tree: ast.Module) -> set[str]:
    """The functions of a module that write a status into task_run_users: through a
    statement built at module level that sets one, or with a statement on the table
    (`update(task_run_users)`, or one built on it) given a `status` value."""
    on_table: set[str] = set()
    setting: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and "task_run_users" in ast.unparse(node.value):
            names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            on_table |= names
            if sets_status(node.value):
                setting |= names
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        writes = bool(names & on_table) or "update(task_run_users)" in ast.unparse(node)
        if names & setting or (writes and sets_status(node)):
            found.add(node.name)
    return found


def test_a_units_end_is_written_by_one_function() -> None:
    """Every way a (run, user) unit ends (the agent's outcome, a lost agent process or worker,
    recovery) goes through `RunStore._end_in` (`end_unit`), which decides the next state
    (retrying or final) under the task's retry policy. Besides it, only creation (pending, or
    skipped), the claim (running, or skipped: another run holds the lock) and the bulk end of
    units not running (`_end_waiting_in`: a cancel, a shutdown, a spent budget) write a
    status."""
    (store,) = [tree for name, tree in modules() if name == "ralph.background.run_store"]
    assert status_writers(store) == {"create_in", "start_user", "_end_in", "_end_waiting_in"}
