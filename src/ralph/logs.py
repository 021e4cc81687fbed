"""Structured logging: JSON lines when not on a TTY, readable lines on one."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Configure structlog and the standard library's root logger once per process."""
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Agno logs every model call at INFO; keep it for debugging only.
    logging.getLogger("agno").setLevel(max(logging.WARNING, root.level))
    # One INFO line per HTTP request to the model provider: debugging only.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
    # MariaDB notes such as "Name 'pk_x' ignored for PRIMARY key" during migrations.
    logging.getLogger("asyncmy").setLevel(max(logging.ERROR, root.level))
