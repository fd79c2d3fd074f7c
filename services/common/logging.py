"""structlog set-up: once per process, console for a terminal, JSON otherwise.

Every process calls ``configure_logging(role=..., rank=...)`` at start; those keys are bound
into every event. Request-scoped code binds ``request_id`` with ``bind_request``. Logs go to
stderr so that stdout stays free for machine-readable output (``--json``).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(role: str, rank: int | None = None, *, level: str | None = None,
                      json: bool | None = None) -> structlog.stdlib.BoundLogger:
    """Configure structlog for this process and return a logger bound with role/rank.

    ``json`` defaults to True unless stderr is a terminal; ``XDS_LOG_FORMAT=json|console``
    and ``XDS_LOG_LEVEL`` override. Calling it again only rebinds the context.
    """
    global _configured
    level_name = (level or os.environ.get("XDS_LOG_LEVEL", "info")).upper()
    fmt = os.environ.get("XDS_LOG_FORMAT")
    if json is None:
        json = fmt == "json" if fmt else not sys.stderr.isatty()
    if not _configured:
        renderer: Any = (structlog.processors.JSONRenderer() if json
                         else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                renderer,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelName(level_name) if isinstance(logging.getLevelName(level_name), int)
                else logging.INFO),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=True,
        )
        _configured = True
    structlog.contextvars.clear_contextvars()
    ctx: dict[str, Any] = {"role": role}
    if rank is not None:
        ctx["rank"] = rank
    structlog.contextvars.bind_contextvars(**ctx)
    return structlog.get_logger()


def get_logger(**bind: Any) -> structlog.stdlib.BoundLogger:
    """A logger; processes that never called ``configure_logging`` (CLI tools, benchmarks,
    tests) get the stderr set-up with role "cli", so stdout stays clean for ``--json``."""
    if not _configured:
        configure_logging(role="cli")
    return structlog.get_logger().bind(**bind) if bind else structlog.get_logger()


def bind_request(request_id: str) -> None:
    """Bind ``request_id`` into the current context (task-local under asyncio)."""
    structlog.contextvars.bind_contextvars(request_id=request_id)
