"""The HTTP stack both HTTP doors share: an ASGI app (FastAPI) served by uvicorn.

One stack for the KServe v2 REST door (``kserve_rest.py``) and the OpenAI door, as trtllm-serve,
vLLM and Triton's OpenAI frontend serve theirs (FastAPI + uvicorn).

Where it runs: on the event loop that owns the orchestrator. The disaggregated orchestrator's
ZeroMQ sockets and the gRPC front door live on ``RouterService``'s loop thread and are not
thread-safe, so the HTTP server runs as one more task on that loop (``AsyncHttpDoor``, started
and stopped from the loop, as ``AsyncFrontDoor`` is): an HTTP request reaches the same
orchestrator object through the same coroutine calls as a gRPC one, with no thread hop and no
second loop. uvicorn's protocol handlers are asyncio-native, so serving HTTP never blocks the gRPC
path more than any other coroutine on that loop does. ``HttpDoor`` is the context manager for
callers without a loop (tests, single-engine mode): it runs ``AsyncHttpDoor`` on a given loop
(running in another thread) or on its own event-loop thread, which it joins on ``close()``.

Binding: the door binds ``host:port`` itself (port 0: a free port, reported back as ``port``;
a taken port is a ``ConfigError``) and hands the socket to uvicorn, so the bound port is known
before the first request and no uvicorn ``sys.exit`` can end the caller's process.

Shutdown: ``stop()`` stops accepting at once, lets requests in flight (streams included) run for
``shutdown_grace_s``, then cancels their tasks (which closes the app's generators and so cancels
their requests in the engines) and closes whatever connection is left; it never waits longer than
``shutdown_grace_s + STOP_MARGIN_S``. uvicorn installs no signal handlers here (it only does so on
the main thread, and the door always serves from a loop that the caller's signal handling owns).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = ["STOP_MARGIN_S", "AsyncHttpDoor", "HttpDoor", "HttpDoorConfig"]

log = get_logger(__name__)

STOP_MARGIN_S = 2.0  # beyond the grace: cancelled tasks finish, the listener closes


@dataclass(frozen=True)
class HttpDoorConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # Triton's HTTP port; 0 binds a free port
    shutdown_grace_s: float = 1.0  # in-flight requests' time to finish on stop()
    start_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"HttpDoorConfig.port {self.port} is out of range")
        if self.shutdown_grace_s < 0 or self.start_timeout_s <= 0:
            raise ConfigError("HttpDoorConfig: shutdown_grace_s >= 0 and start_timeout_s > 0")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, brackets allowed).

    Raises ConfigError when the address cannot be bound (taken, unknown host)."""
    bare = host.strip("[]")
    try:
        family = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((bare, port), family=family, backlog=2048, reuse_port=False)
        # Accepted connections inherit TCP_NODELAY from the listener (Linux). asyncio sets it
        # itself only on sockets whose proto is IPPROTO_TCP, and create_server's is 0: without
        # this, a response's header and body writes met Nagle and delayed ACKs, +40 ms each.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        raise ConfigError(f"HTTP door cannot bind {host}:{port}: {exc}") from exc
    sock.setblocking(False)
    return sock


def url_for(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 hosts bracketed)."""
    bare = host.strip("[]")
    shown = f"[{bare}]" if ":" in bare else bare
    return f"http://{shown}:{port}"


class _Server(uvicorn.Server):
    """uvicorn's server without signal capture: the door's owner handles signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


class AsyncHttpDoor:
    """``app`` served by uvicorn on the running event loop. Not thread-safe: call from that loop."""

    def __init__(self, app: Any, config: HttpDoorConfig | None = None, name: str = "http") -> None:
        self.app = app
        self.config = config or HttpDoorConfig()
        self.name = name
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound door (after ``start()``)."""
        return url_for(self.config.host, self.port or self.config.port)

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Raises ConfigError if it cannot bind or the
        server does not come up within ``start_timeout_s``."""
        sock = bind(self.config.host, self.config.port)
        port = int(sock.getsockname()[1])
        uv_config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            # typed int upstream, but used as asyncio.timeout(...) seconds: a float is honoured
            timeout_graceful_shutdown=self.config.shutdown_grace_s,  # type: ignore[arg-type]
            server_header=False,
        )
        server = _Server(uv_config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"{self.name}-door")
        deadline = time.monotonic() + self.config.start_timeout_s
        while not server.started and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if not server.started:
            server.should_exit = True
            await _finish(task, STOP_MARGIN_S)
            sock.close()
            raise ConfigError(f"{self.name} door on {self.config.host}:{port} did not start")
        self._server, self._task, self.port = server, task, port
        log.info("http_door_started", door=self.name, host=self.config.host, port=port)
        return port

    async def stop(self) -> None:
        """Stop accepting; in-flight requests get ``shutdown_grace_s``, then are cancelled and
        their connections closed. Idempotent; returns within ``shutdown_grace_s +
        STOP_MARGIN_S``."""
        server, task = self._server, self._task
        self._server, self._task = None, None
        if server is None or task is None:
            return
        server.should_exit = True
        await _finish(task, self.config.shutdown_grace_s + STOP_MARGIN_S)
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.close()
        log.info("http_door_stopped", door=self.name, port=self.port)


async def _finish(task: asyncio.Task[None], timeout_s: float) -> None:
    """Wait for the server task at most ``timeout_s``; cancel it if it is still running."""
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_MARGIN_S)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("http_door_failed", error=repr(task.exception()))


class HttpDoor:
    """``AsyncHttpDoor`` for callers without a loop; a context manager that joins what it started.

    With ``loop`` (an event loop already running in another thread, e.g. the one that owns the
    orchestrator) the server runs there; without it, on a dedicated event-loop thread.
    ``start()`` (called by ``__enter__``) returns the bound port, also ``self.port``.
    """

    def __init__(
        self,
        app: Any,
        config: HttpDoorConfig | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        name: str = "http",
    ) -> None:
        self._door = AsyncHttpDoor(app, config, name)
        self._own_loop = loop is None
        self._loop = loop or asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        if self._own_loop:
            self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-door",
                                            daemon=True)  # fmt: skip
        self.port: int | None = None

    @property
    def config(self) -> HttpDoorConfig:
        return self._door.config

    @property
    def url(self) -> str:
        """``http://host:port`` for HTTP clients (after ``start()``)."""
        return self._door.url

    def start(self) -> int:
        if self._thread is not None:
            self._thread.start()
        try:
            future = asyncio.run_coroutine_threadsafe(self._door.start(), self._loop)
            self.port = future.result(self.config.start_timeout_s + STOP_MARGIN_S)
        except BaseException:
            self.close()
            raise
        return self.port

    def close(self) -> None:
        """Stop the server (in-flight requests get ``shutdown_grace_s``); stop and join the
        door's own loop thread, if it has one. Idempotent."""
        if self._loop.is_closed():
            return
        budget_s = self.config.shutdown_grace_s + 3 * STOP_MARGIN_S
        running = self._thread.is_alive() if self._thread is not None else self._loop.is_running()
        try:
            if running:
                stopping = asyncio.run_coroutine_threadsafe(self._door.stop(), self._loop)
                stopping.result(budget_s)
        finally:
            if self._thread is not None:
                if self._thread.is_alive():
                    self._loop.call_soon_threadsafe(self._loop.stop)
                    self._thread.join(budget_s)
                if not self._thread.is_alive():
                    self._loop.close()

    def __enter__(self) -> HttpDoor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
