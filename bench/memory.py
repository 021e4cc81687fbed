"""The cost of a memory change with Dolt versioning (RALPH_MEMORY_VERSIONING=dolt, embedded
doltlite) against the same change without it, measured in the same run.

Each configuration runs in a process of its own (doltlite must replace SQLite before
`sqlite3` is imported): stock SQLite without versioning (baseline), doltlite without
versioning (the engine alone), doltlite with a Dolt commit per change. In each: 300 block
PUTs spread over 30 users, then 300 proposal approvals, through the services (no HTTP);
prints the median ms per change.

    uv run python bench/memory.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("AGNO_TELEMETRY", "false")

CHANGES = 300
USERS = 30


async def measure(data_dir: Path, versioning: str) -> dict[str, float]:
    from ralph.composition import open_services
    from ralph.config import Settings
    from ralph.logs import configure_logging
    from ralph.memory.models import ProposalDraft

    configure_logging("warning", json=True)
    settings = Settings(
        data_dir=data_dir,
        worker_mode="inprocess",
        scheduler_enabled=False,
        memory_versioning=versioning,  # type: ignore[arg-type]
        _env_file=None,  # type: ignore[call-arg]
    )
    async with open_services(settings) as services:
        memory = services.memory
        puts: list[float] = []
        for i in range(CHANGES):
            started = time.perf_counter()
            await memory.put_block(
                f"user{i % USERS}", "notes", title="Notes", body=f"note {i}\n" * 20, author="api"
            )
            puts.append(time.perf_counter() - started)
        ids: list[str] = []
        for i in range(CHANGES):
            draft = ProposalDraft(
                user_id=f"user{i % USERS}",
                label="goals",
                reason="bench",
                author="agent:bench",
                append=f"goal {i}",
                run_id="bench",  # one run: its edits of a block do not supersede each other
            )
            ids.append((await memory.propose(draft))[0].id)
        approvals: list[float] = []
        for proposal_id in ids:
            started = time.perf_counter()
            await memory.approve(proposal_id)
            approvals.append(time.perf_counter() - started)
    return {
        "put_ms": statistics.median(puts) * 1000,
        "approve_ms": statistics.median(approvals) * 1000,
    }


def child(configuration: str) -> dict[str, float]:
    """Run one configuration in a fresh process; its figures as JSON on stdout."""
    env = {**os.environ, "RALPH_MEMORY_VERSIONING": "none"}
    env.pop("LD_PRELOAD", None)
    env.pop("_DOLTLITE_BOOTSTRAPPED", None)
    if configuration != "sqlite":
        env["RALPH_MEMORY_VERSIONING"] = "dolt"  # the preload (ralph's package import)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, __file__, "--child", configuration, tmp],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        # importing ralph (in `measure`) preloads doltlite if the environment asks for it
        versioning = "dolt" if sys.argv[2] == "dolt" else "none"
        print(json.dumps(asyncio.run(measure(Path(sys.argv[3]), versioning))))
        return
    stock = child("sqlite")
    engine = child("doltlite")
    dolt = child("dolt")
    print(f"memory changes, median ms per change ({CHANGES} PUTs, {CHANGES} approvals):")
    for name, figures in (
        ("stock SQLite, no versioning (baseline)", stock),
        ("doltlite, no versioning", engine),
        ("doltlite, a Dolt commit per change", dolt),
    ):
        put, approve = figures["put_ms"], figures["approve_ms"]
        print(
            f"  {name:42s} PUT {put:6.2f} ms (x{put / stock['put_ms']:.2f})"
            f"   approve {approve:6.2f} ms (x{approve / stock['approve_ms']:.2f})"
        )


if __name__ == "__main__":
    main()
