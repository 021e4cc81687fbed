"""A full garbage collection in a process that has imported what a server runs (Agno, the
OpenAI client, SQLAlchemy, FastAPI), before and after `freeze_startup_heap` (what `ralph
serve`, `ralph worker` and the agent process do once started): the pause an event loop sees
when the collector walks the whole heap. Median of 5 each, same run.

    uv run python bench/gc_pause.py
"""

from __future__ import annotations

import gc
import importlib
import os
import statistics
import time

os.environ.setdefault("AGNO_TELEMETRY", "false")

from ralph.aio import freeze_startup_heap


def full_collection_ms() -> float:
    timings: list[float] = []
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def main() -> None:
    # the server's imports: the app, its services, Agno, the OpenAI client, SQLAlchemy
    importlib.import_module("ralph.app")
    objects = len(gc.get_objects())
    before = full_collection_ms()
    freeze_startup_heap()
    after = full_collection_ms()
    print(f"full collection over {objects:,} objects: {before:.1f} ms")
    print(f"after freeze_startup_heap: {after * 1000:.1f} us (x{after / before:.5f})")


if __name__ == "__main__":
    main()
