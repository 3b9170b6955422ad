"""``EtcdLeadership.stop`` waits for its campaign task a bounded time and never swallows a
cancellation of its caller (awaiting the task inside ``suppress(CancelledError)`` did both: a
campaign task that did not end at once held ``stop`` until the caller's own 60 s deadline
cancelled it, and that cancellation was swallowed). No etcd: the client is a stand-in whose
only call here is ``close``, and the campaign task is one that ignores its first cancel."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from trtllm_prfaas.discovery.leader import EtcdLeadership, LeaderConfig

CALL_TIMEOUT_S = 0.2


class _Client:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _elector() -> tuple[EtcdLeadership, _Client]:
    config = LeaderConfig(endpoints=(("127.0.0.1", 1),), namespace="t", replica_id="r",
                          call_timeout_s=CALL_TIMEOUT_S)  # fmt: skip
    client = _Client()
    return EtcdLeadership(config, client=client), client


async def _stubborn(release: asyncio.Event) -> None:
    """A campaign task that does not end when cancelled, only when released."""
    while not release.is_set():
        with contextlib.suppress(asyncio.CancelledError):
            await release.wait()


async def _with_stubborn_task() -> tuple[EtcdLeadership, _Client, asyncio.Event]:
    """An elector whose campaign task is :func:`_stubborn`, running; set the event to end it."""
    elector, client = _elector()
    release = asyncio.Event()
    elector._task = asyncio.create_task(_stubborn(release))
    await asyncio.sleep(0)
    return elector, client, release


@pytest.mark.timeout(20)  # the unbounded stop hung here for good
def test_stop_is_bounded_when_the_campaign_task_does_not_end() -> None:
    async def scenario() -> float:
        elector, client, release = await _with_stubborn_task()
        start = time.monotonic()
        await elector.stop(resign=False)
        took = time.monotonic() - start
        assert client.closed
        release.set()
        return took

    took = asyncio.run(scenario())
    assert took < CALL_TIMEOUT_S + 2.0 + 1.0


@pytest.mark.timeout(20)
def test_stop_does_not_swallow_its_callers_cancellation() -> None:
    async def scenario() -> None:
        elector, _, release = await _with_stubborn_task()
        stopping = asyncio.create_task(elector.stop(resign=False))
        await asyncio.sleep(0.05)  # stop is waiting for the stubborn task
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        release.set()

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_a_call_that_ends_as_its_task_is_cancelled_ends_the_task() -> None:
    """The root cause of the stopped leader's task that stayed "cancelling": Python 3.11's
    ``asyncio.wait_for`` returns the result of a call that finished as the task was cancelled
    and drops the cancellation (gh-86296), so ``_lead`` slept on. ``_call`` must raise it."""

    async def scenario() -> None:
        elector, _ = _elector()
        release, finished = threading.Event(), threading.Event()

        def call() -> str:
            release.wait(5)
            finished.set()
            return "done"

        task = asyncio.create_task(elector._call(call))
        await asyncio.sleep(0.05)  # the call is in its thread
        release.set()
        assert finished.wait(5)
        time.sleep(0.05)  # blocking the loop: the thread's result waits in the loop's queue
        await asyncio.sleep(0)  # one pass: the result lands and the call's task ends ...
        task.cancel()  # ... and the cancel comes before wait_for's waiter hears of it
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
