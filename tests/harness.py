"""Process harness for tests: start ``prfaas`` subprocesses on loopback, stop them by PID.

Every process started here is stopped (SIGTERM, then SIGKILL after a timeout) by the fixture or
context manager that started it, even when the test fails.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from trtllm_prfaas.testbed.processes import WorkerProcess, spawn_worker
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient

__all__ = ["WorkerProcess", "collect", "new_uuid", "serving_on_thread", "spawn_worker", "wait_for"]

if TYPE_CHECKING:
    from trtllm_prfaas.worker.server import WorkerServer

Server = TypeVar("Server", bound="WorkerServer")


@contextmanager
def serving_on_thread(server: Server) -> Iterator[Server]:
    """``server`` (already entered) serving on a thread; stopped and joined even on failure."""
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()


def new_uuid() -> str:
    return uuid.uuid4().hex


def collect(client: WorkerClient, request_id: str, timeout_s: float = 60.0) -> p.Tokens:
    """Gather a request's tokens until it finishes; returns one Tokens with all of them."""
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        message = client.recv(remaining)
        if isinstance(message, p.Tokens) and message.request_id == request_id:
            tokens += message.token_ids
            if message.finished:
                return p.Tokens(
                    request_id,
                    tokens,
                    True,
                    message.finish_reason,
                    message.error_kind,
                    message.error_message,
                    message.num_connector_tokens,
                )
    raise TimeoutError(f"request {request_id} did not finish within {timeout_s}s")


def wait_for(client: WorkerClient, kind: type, predicate: Any, timeout_s: float = 30.0) -> Any:
    """The first message of ``kind`` satisfying ``predicate`` (others are dropped)."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        message = client.recv(remaining)
        if isinstance(message, kind) and predicate(message):
            return message
    raise TimeoutError(f"no {kind.__name__} matching within {timeout_s}s")
