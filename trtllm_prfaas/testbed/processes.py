"""Start ``prfaas worker`` processes and stop them by PID (used by ``prfaas up`` and tests)."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trtllm_prfaas.errors import PrfaasError
from trtllm_prfaas.transport import RelaySecurity
from trtllm_prfaas.worker.client import WorkerClient

__all__ = [
    "WorkerProcess",
    "launch_prfaas",
    "read_ready_line",
    "spawn_worker",
    "start_workers",
    "stop_process",
]


@dataclass
class WorkerProcess:
    name: str
    process: subprocess.Popen[str]
    ready: dict[str, Any] = field(default_factory=dict)
    clients: list[WorkerClient] = field(default_factory=list)
    control_security: RelaySecurity | None = None  # Curve: the router's keys (None: plaintext)

    @property
    def control(self) -> str:
        return str(self.ready["control"])

    @property
    def relay(self) -> str:
        return str(self.ready["relay"])

    def client(self) -> WorkerClient:
        client = WorkerClient(self.control, security=self.control_security)
        self.clients.append(client)
        return client

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code. Idempotent."""
        for client in self.clients:
            client.close()
        self.clients.clear()
        return stop_process(self.process, timeout_s)


def stop_process(process: subprocess.Popen[str], timeout_s: float) -> int:
    """SIGTERM a process this code started, wait ``timeout_s``, SIGKILL if it is still there;
    returns its exit code. Idempotent."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return int(process.returncode)


def launch_prfaas(
    command: str,
    args: Sequence[str],
    *,
    log_level: str = "ERROR",
    json_logs: bool = False,
    prefix: Sequence[str] = (),
    stderr: Any = None,
    cwd: Any = None,
) -> subprocess.Popen[str]:
    """A ``prfaas COMMAND ARGS`` child (``python -m trtllm_prfaas``, unbuffered) with its stdout
    piped for the ready line; ``prefix``: a command it runs under (``ip netns exec NS``, which
    must exec it), ``stderr``: where its log goes (inherited by default). The caller stops it
    by PID (``stop_process``)."""
    logs = ["--log-level", log_level, *(["--log-json"] if json_logs else [])]
    cmd = [*prefix, sys.executable, "-m", "trtllm_prfaas", *logs, command, *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=cwd)


def _launch(
    name: str, args: list[str], log_level: str, prefix: Sequence[str] = ()
) -> WorkerProcess:
    return WorkerProcess(name, launch_prfaas("worker", args, log_level=log_level, prefix=prefix))


def start_workers(
    specs: dict[str, list[str]],
    timeout_s: float = 90.0,
    log_level: str = "ERROR",
    control_security: RelaySecurity | None = None,
    prefixes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, WorkerProcess]:
    """Launch every worker at once, then wait for each ready line; on failure stop them all.
    ``control_security``: what ``WorkerProcess.client()`` connects with (the router's keys when
    the workers' control plane is Curve). ``prefixes``: a command to run a worker under, by
    name (``ip netns exec NS`` for the namespace testbed; it must exec the worker itself)."""
    prefixes = prefixes or {}
    workers = {
        name: _launch(name, args, log_level, prefixes.get(name, ())) for name, args in specs.items()
    }
    for worker in workers.values():
        worker.control_security = control_security
    try:
        deadline = time.monotonic() + timeout_s
        for worker in workers.values():
            worker.ready = _read_ready(worker, deadline)
    except BaseException:
        for worker in workers.values():
            worker.stop()
        raise
    return workers


def spawn_worker(
    role: str,
    cluster: str,
    *extra: str,
    timeout_s: float = 90.0,
    control_security: RelaySecurity | None = None,
) -> WorkerProcess:
    """One worker (``--role``/``--cluster`` plus ``extra`` flags), ready to serve; its
    ``client()`` connects with ``control_security`` (the router's keys for a Curve worker)."""
    name = f"{cluster}-{role}"
    args = ["--role", role, "--cluster", cluster, *extra]
    return start_workers({name: args}, timeout_s, control_security=control_security)[name]


def _read_ready(worker: WorkerProcess, deadline: float) -> dict[str, Any]:
    return read_ready_line(worker.process, f"worker {worker.name}", deadline)


def read_ready_line(process: subprocess.Popen[str], what: str, deadline: float) -> dict[str, Any]:
    """The JSON ``{"event": "ready", ...}`` line a ``prfaas worker``/``router`` child prints on
    stdout; PrfaasError naming ``what`` if it exits first or is silent past ``deadline``."""
    stdout = process.stdout
    assert stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise PrfaasError(f"{what} exited with {process.returncode} before ready")
            if selector.select(timeout=0.2):
                line = stdout.readline()
                if line.startswith("{"):
                    data: dict[str, Any] = json.loads(line)
                    if data.get("event") == "ready":
                        return data
    raise PrfaasError(f"{what} did not become ready in time")
