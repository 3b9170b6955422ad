"""The router as a service: orchestrator + KServe front doors + /metrics, on one event loop.

``RouterService`` runs them on a dedicated event-loop thread (the orchestrator's ZeroMQ sockets,
the gRPC server and, with ``http_port`` / ``openai_port``, the KServe v2 REST and OpenAI doors'
uvicorn servers share that loop, so every door reaches the same orchestrator with no thread
hop); it is a context manager whose ``close()`` drains the doors together, then stops the
orchestrator and the metrics server and joins the thread.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

from prometheus_client import CollectorRegistry

from trtllm_prfaas.router.frontdoor import AsyncFrontDoor
from trtllm_prfaas.router.http_door import AsyncHttpDoor, HttpDoorConfig
from trtllm_prfaas.router.kserve_rest import rest_app
from trtllm_prfaas.router.openai_door import OpenAIConfig, build_openai_app
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig
from trtllm_prfaas.router.servicer import FrontDoorConfig
from trtllm_prfaas.telemetry.metrics import MetricsServer, RouterMetrics

__all__ = ["RouterService"]


class RouterService:
    def __init__(
        self,
        router: RouterConfig,
        frontdoor: FrontDoorConfig,
        metrics_port: int | None = 8002,
        metrics_host: str | None = None,  # None: the front door's host
        http_port: int | None = None,  # KServe v2 REST (Triton: 8000); None: no REST door
        http_host: str | None = None,  # None: the front door's host
        openai_port: int | None = None,  # OpenAI-compatible API (Triton: 9000); None: none
        openai_host: str | None = None,  # None: the front door's host
    ) -> None:
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        self.orchestrator = DisaggregatedOrchestrator(router, self.metrics)
        self._door = AsyncFrontDoor(self.orchestrator, frontdoor, self.metrics)
        self.http_doors: list[AsyncHttpDoor] = []  # started after the gRPC door, in order
        if http_port is not None:
            app = rest_app(self.orchestrator, frontdoor, self.metrics)
            config = HttpDoorConfig(http_host or frontdoor.host, http_port,
                                    shutdown_grace_s=frontdoor.shutdown_grace_s)  # fmt: skip
            self.http_doors.append(AsyncHttpDoor(app, config, name="kserve-rest"))
        if openai_port is not None:
            openai = build_openai_app(
                self.orchestrator,
                config=OpenAIConfig(request_timeout_s=frontdoor.request_timeout_s),
                metrics=self.metrics,
            )
            config = HttpDoorConfig(openai_host or frontdoor.host, openai_port,
                                    shutdown_grace_s=frontdoor.shutdown_grace_s)  # fmt: skip
            self.http_doors.append(AsyncHttpDoor(openai, config, name="openai"))
        self._metrics_port = metrics_port
        self._metrics_host = metrics_host
        self.metrics_server: MetricsServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="router", daemon=True)
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"{self._door.config.host}:{self.port}"

    @property
    def http_url(self) -> str | None:
        """The KServe v2 REST door's ``http://host:port`` (after ``start()``); None without."""
        return self._url_of("kserve-rest")

    @property
    def openai_url(self) -> str | None:
        """The OpenAI-compatible door's ``http://host:port`` (after ``start()``); None without."""
        return self._url_of("openai")

    def _url_of(self, name: str) -> str | None:
        return next((door.url for door in self.http_doors if door.name == name), None)

    def start(self, timeout_s: float = 60.0) -> None:
        """Connect to the workers, then open the front door and the metrics endpoint."""
        self._thread.start()
        try:
            self._run(self.orchestrator.start(), timeout_s)
            self.port = self._run(self._door.start(), timeout_s)
            for door in self.http_doors:
                self._run(door.start(), timeout_s)
            if self._metrics_port is not None:
                host = self._metrics_host or self._door.config.host
                self.metrics_server = MetricsServer(self.registry, self._metrics_port, host)
        except BaseException:
            self.close()
            raise
        freeze_startup_heap()

    def _run(self, coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def run_on_loop(self, coro: Any, timeout_s: float) -> Any:
        """Run ``coro`` on the router's loop (where the orchestrator lives) and return its
        result, from another thread; raises TimeoutError after ``timeout_s``."""
        return self._run(coro, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop everything and join the loop thread. Idempotent. The front door stops taking
        new RPCs at once; those in flight get its ``shutdown_grace_s`` to finish (then they are
        cancelled), so this may take up to ``shutdown_grace_s + timeout_s``. ``/metrics`` is
        served until the requests in flight are done."""
        try:
            if not self._loop.is_closed() and self._thread.is_alive():
                self._stop_loop(timeout_s)
        finally:
            if self.metrics_server is not None:
                self.metrics_server.close()
                self.metrics_server = None
        if not self._loop.is_closed() and not self._thread.is_alive():
            self._loop.close()

    def _stop_loop(self, timeout_s: float) -> None:
        """Drain the front door, close the orchestrator, stop and join the loop thread."""
        try:
            self._run(self._stop_doors(), timeout_s + self._door.config.shutdown_grace_s)
            self._run(self.orchestrator.close(), timeout_s)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)

    async def _stop_doors(self) -> None:
        """Drain every door at once (each gives its requests ``shutdown_grace_s``)."""
        stops = [self._door.stop(), *(door.stop() for door in self.http_doors)]
        for outcome in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    def __enter__(self) -> RouterService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (imports, the doors' FastAPI and pydantic models,
    the tokenizer, protobuf descriptors: ~280K objects in the router) to CPython's permanent
    generation. A full (gen2) collection walks every tracked object; unfrozen, each one paused the
    router's loop for 150-360 ms (measured with ``gc.callbacks`` under ``bench/router.py``), and
    those pauses were the whole p99 tail of the router's doors. Objects created later are collected
    as before; the frozen ones live as long as the process anyway (``gc.freeze``, Python >= 3.7)."""
    gc.collect()
    gc.freeze()
