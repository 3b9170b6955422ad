"""Process harness for tests: start ``prfaas`` subprocesses on loopback, stop them by PID.

Every process started here is stopped (SIGTERM, then SIGKILL after a timeout) by the fixture or
context manager that started it, even when the test fails.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.client import WorkerClient

READY_TIMEOUT_S = 60.0


@dataclass
class WorkerProcess:
    process: subprocess.Popen[str]
    ready: dict[str, Any]
    clients: list[WorkerClient] = field(default_factory=list)

    @property
    def control(self) -> str:
        return str(self.ready["control"])

    @property
    def relay(self) -> str:
        return str(self.ready["relay"])

    def client(self) -> WorkerClient:
        client = WorkerClient(self.control)
        self.clients.append(client)
        return client

    def stop(self, timeout_s: float = 15.0) -> int:
        for client in self.clients:
            client.close()
        self.clients.clear()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode


def spawn_worker(role: str, cluster: str, *extra: str) -> WorkerProcess:
    """Start ``prfaas worker`` and wait for its ready line (its stderr goes to ours)."""
    cmd = [
        sys.executable,
        "-m",
        "trtllm_prfaas",
        "--log-level",
        "ERROR",
        "worker",
        "--role",
        role,
        "--cluster",
        cluster,
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        ready = _read_ready(process)
    except BaseException:
        process.kill()
        process.wait(5)
        raise
    return WorkerProcess(process, ready)


def _read_ready(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with {process.returncode} before ready")
            if selector.select(timeout=0.2):
                line = process.stdout.readline()
                if line.startswith("{"):
                    data: dict[str, Any] = json.loads(line)
                    if data.get("event") == "ready":
                        return data
        raise RuntimeError("worker did not become ready in time")
    finally:
        selector.close()


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
