"""Ralph: LLM agents that keep a memory of each user and work for them in the background."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ralph")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
