"""Ralph: LLM agents that keep a memory of each user and work for them in the background."""

from ralph.dolt_preload import preload_if_configured

# before anything imports sqlite3 (RALPH_MEMORY_VERSIONING=dolt only)
preload_if_configured()

from importlib.metadata import PackageNotFoundError, version  # noqa: E402

try:
    __version__ = version("ralph")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
