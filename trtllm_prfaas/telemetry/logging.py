"""Structured logging: one ``configure_logging`` at the edge, ``get_logger`` everywhere else.

Every record is a structlog event with key/value pairs; request-scoped code binds ``request_id``
(``log = get_logger(__name__).bind(request_id=rid)``) so one grep follows a request across
router, workers and relay.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """Configure structlog once, from ``cli.py``. Safe to call again (it reconfigures)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    """A logger on the ``sys.stderr`` of the moment: loggers are lazy (``get_logger``), and a
    stream captured at configure time may be closed later (pytest's capture, a daemon's)."""
    return structlog.PrintLogger(sys.stderr)


def get_logger(name: str) -> Any:
    """A structlog logger carrying ``component=name``. Lazy: each call resolves the current
    configuration, so a module-level logger follows a later ``configure_logging`` (and
    ``structlog.testing.capture_logs``) instead of keeping the processors of import time."""
    return structlog.get_logger(component=name)
