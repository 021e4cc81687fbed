"""Make doltlite the process's SQLite, for `RALPH_MEMORY_VERSIONING=dolt` on SQLite.

doltlite swaps the SQLite library under Python's `sqlite3` module, which only works before
`sqlite3` is imported (otherwise it re-executes the interpreter with `LD_PRELOAD`). `ralph`'s
package import calls `preload_if_configured()` first thing, so `ralph serve`, `ralph worker`,
`ralph migrate` and the server's agent process all get it. The library is also put in
`LD_PRELOAD` for the processes this one starts (doltlite marks the environment as done,
which would make a child skip its own preload).

Read from the environment only (not from `.env`): the choice must be known before anything
else is imported.
"""

from __future__ import annotations

import os
import sys


def wanted() -> bool:
    if os.environ.get("RALPH_MEMORY_VERSIONING", "").strip().lower() != "dolt":
        return False
    url = os.environ.get("RALPH_DATABASE_URL", "").strip()
    return not url or url.startswith("sqlite")


def preload_if_configured() -> None:
    if not wanted():
        return
    try:
        # the import is the preload
        import doltlite  # noqa: F401  # pyright: ignore[reportMissingTypeStubs, reportUnusedImport]
    except ImportError:
        sys.stderr.write(
            "error: RALPH_MEMORY_VERSIONING=dolt on SQLite needs the doltlite package "
            "(pip install 'ralph[dolt]')\n"
        )
        raise SystemExit(2) from None
    from doltlite import libdoltlite_path  # pyright: ignore[reportMissingTypeStubs]

    lib: str = libdoltlite_path()
    preloaded = os.environ.get("LD_PRELOAD", "").split()
    if lib not in preloaded:
        os.environ["LD_PRELOAD"] = " ".join([lib, *preloaded])
