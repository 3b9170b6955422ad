"""``cancel_and_wait``: bounded, loud about tasks that fail or do not stop, and it lets its
caller's own cancellation through (the ``suppress(CancelledError)`` pattern it replaced in the
leader, the control loop, discovery and the fake worker did neither)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
import structlog

from trtllm_prfaas.tasks import cancel_and_wait


async def _stubborn(release: asyncio.Event) -> None:
    """Ends only when released: every cancel is caught."""
    while not release.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()


async def _fails_when_cancelled() -> None:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        raise RuntimeError("cleanup broke") from None


async def _fails_at_once() -> None:
    raise ValueError("before stop")


@pytest.mark.timeout(20)
def test_plain_tasks_are_cancelled_and_nothing_is_logged() -> None:
    async def scenario() -> tuple[list[Any], list[asyncio.Task[Any]], list[Any]]:
        tasks = [asyncio.create_task(asyncio.sleep(60), name=f"s{i}") for i in range(3)]
        await asyncio.sleep(0)
        with structlog.testing.capture_logs() as logs:
            stuck = await cancel_and_wait([*tasks, None], 5.0, "test")
        return stuck, tasks, logs

    stuck, tasks, logs = asyncio.run(scenario())
    assert stuck == [] and all(task.cancelled() for task in tasks)
    assert logs == []


@pytest.mark.timeout(20)
def test_a_task_that_does_not_stop_is_returned_and_logged_after_the_bound() -> None:
    async def scenario() -> tuple[float, list[str], list[Any]]:
        release = asyncio.Event()
        task = asyncio.create_task(_stubborn(release), name="stubborn")
        await asyncio.sleep(0)
        start = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            stuck = await cancel_and_wait([task], 0.3, "test")
        took = time.monotonic() - start
        release.set()
        await task
        return took, [t.get_name() for t in stuck], logs

    took, stuck, logs = asyncio.run(scenario())
    assert stuck == ["stubborn"] and 0.25 <= took < 5.0
    assert [(e["event"], e["task"], e["owner"]) for e in logs] == [
        ("task_did_not_stop", "stubborn", "test")
    ]


@pytest.mark.timeout(20)
def test_failures_are_logged_not_raised() -> None:
    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(_fails_when_cancelled(), name="on-cancel"),
                 asyncio.create_task(_fails_at_once(), name="early")]  # fmt: skip
        await asyncio.sleep(0.01)  # "early" has failed already
        with structlog.testing.capture_logs() as logs:
            assert await cancel_and_wait(tasks, 5.0, "test") == []
        return logs

    logs = asyncio.run(scenario())
    failed = {e["task"]: e["error"] for e in logs if e["event"] == "task_failed"}
    assert failed == {"on-cancel": "RuntimeError('cleanup broke')",
                      "early": "ValueError('before stop')"}  # fmt: skip


@pytest.mark.timeout(20)
def test_the_callers_cancellation_is_not_swallowed() -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        task = asyncio.create_task(_stubborn(release))
        await asyncio.sleep(0)
        stopping = asyncio.create_task(cancel_and_wait([task], 10.0, "test"))
        await asyncio.sleep(0.05)  # it is waiting for the stubborn task
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        release.set()
        await task

    asyncio.run(scenario())
