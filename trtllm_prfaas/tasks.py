"""Stopping asyncio tasks with a deadline, without swallowing the caller's own cancellation.

The pattern this replaces, ``task.cancel()`` then ``await task`` inside
``suppress(CancelledError)``, has two faults: it waits without end for a task that does not
stop (one stuck in a thread call, or one that catches its first cancel), and it cannot tell the
task's ``CancelledError`` from the caller's, so a caller cancelled while it waits (a test's
``wait_for``, a shutdown deadline) carries on as if nothing happened. ``asyncio.wait`` does
neither: it never raises the tasks' exceptions and it propagates the caller's cancellation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from trtllm_prfaas.telemetry.logging import get_logger

__all__ = ["cancel_and_wait"]

log = get_logger(__name__)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[object] | None], bound_s: float, owner: str
) -> list[asyncio.Task[object]]:
    """Cancel ``tasks`` (``None`` entries are skipped) and wait at most ``bound_s`` for all to
    end. A task that is still running then is logged (``task_did_not_stop``) and returned; one
    that ended with an exception other than its cancellation is logged (``task_failed``): no
    failure is silent. ``owner`` names who stops them in those lines."""
    given = [task for task in tasks if task is not None]
    pending = [task for task in given if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=bound_s)
    stuck = [task for task in pending if not task.done()]
    for task in stuck:
        log.warning("task_did_not_stop", owner=owner, task=task.get_name(), after_s=bound_s)
    for task in given:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("task_failed", owner=owner, task=task.get_name(),
                      error=repr(task.exception()))  # fmt: skip
    return stuck
