"""structlog configuration: JSON lines on stdout with context variables bound per RPC.

Follows structlog's recommended production chain (https://www.structlog.org/en/stable/logging-best-practices.html):
``merge_contextvars`` first, so ``bind_contextvars(rpc=..., shard_id=..., device_id=...)`` shows up
in every line logged while handling a request.
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging", "get_logger"]


def configure_logging(level: str = "INFO", *, json: bool = True) -> None:
    """Configure structlog (and the stdlib root logger) once per process.

    Args:
        level: a stdlib level name such as ``"INFO"``.
        json: JSON lines when True (production), a readable console format otherwise.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr)


def get_logger(component: str) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger carrying ``component=component`` in every line."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=component)
    return logger
