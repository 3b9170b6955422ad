"""The KServe v2 gRPC front door: what stock ``tritonclient.grpc`` talks to, unchanged.

It serves two models over one orchestrator (``served_models.py``): ``tensorrt_llm``, shaped as
TensorRT-LLM's Triton ``llmapi`` model, and ``ensemble``, the classic ``inflight_batcher_llm``
ensemble that genai-perf's ``tensorrtllm`` backend and perf_analyzer speak.

Two ways to host it (the handlers and the error mapping live in ``servicer.py``):

- ``AsyncFrontDoor``: ``await start()`` / ``await stop()`` on the caller's event loop, for an
  orchestrator whose sockets live on that loop (the disaggregated router);
- ``FrontDoor``: a context manager running the server on its own event-loop thread, for tests,
  the CLI and single-engine mode. ``close()`` stops the server (in-flight RPCs are cancelled after
  ``shutdown_grace_s``, which cancels their requests) and joins the thread.

Both bind ``config.host:config.port`` (port 0: a free port) and report the bound port back. The
gRPC message limits are raised from grpcio's 4 MiB to ``config.max_message_bytes``.

Example::

    with LocalEngineOrchestrator(ReferenceEngine(EngineConfig())) as orchestrator, \\
         FrontDoor(orchestrator, FrontDoorConfig(port=0)) as door:
        client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{door.port}")
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any

import grpc
from tritonclient.grpc import service_pb2_grpc

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.api import Orchestrator
from trtllm_prfaas.router.servicer import FrontDoorConfig, KServeServicer
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics

__all__ = ["AsyncFrontDoor", "FrontDoor", "FrontDoorConfig"]

log = get_logger(__name__)


class AsyncFrontDoor:
    """The gRPC server on the running event loop. Not thread-safe: call from that loop."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        config: FrontDoorConfig | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.config = config or FrontDoorConfig()
        self.servicer = KServeServicer(orchestrator, self.config, metrics)
        self._server: Any = None
        self.port: int | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port. Raises ConfigError if it cannot bind."""
        limit = self.config.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),  # a taken port is an error, not a shared one
            ]
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        address = f"{self.config.host}:{self.config.port}"
        try:
            port: int = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"front door cannot bind {address}: {exc}") from exc
        if port == 0:
            raise ConfigError(f"front door cannot bind {address}")
        await server.start()
        self._server, self.port = server, port
        log.info("frontdoor_started", host=self.config.host, port=port,
                 model=self.servicer.orchestrator.model_name)  # fmt: skip
        return port

    async def stop(self) -> None:
        """Stop serving: in-flight RPCs get ``shutdown_grace_s``, then are cancelled. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(self.config.shutdown_grace_s)
            log.info("frontdoor_stopped", port=self.port)


class FrontDoor:
    """``AsyncFrontDoor`` on a dedicated event-loop thread; a context manager.

    ``start()`` (called by ``__enter__``) returns the bound port, also ``self.port``.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        config: FrontDoorConfig | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._door = AsyncFrontDoor(orchestrator, config, metrics)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="frontdoor",
                                        daemon=True)  # fmt: skip
        self.port: int | None = None

    @property
    def config(self) -> FrontDoorConfig:
        return self._door.config

    @property
    def address(self) -> str:
        """``host:port`` for ``tritonclient.grpc.InferenceServerClient(url=...)``."""
        return f"{self.config.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> int:
        self._thread.start()
        try:
            future = asyncio.run_coroutine_threadsafe(self._door.start(), self._loop)
            self.port = future.result(timeout_s)
        except BaseException:
            self.close(timeout_s)
            raise
        return self.port

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the server, stop the loop, join the thread. Idempotent."""
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            stopping = asyncio.run_coroutine_threadsafe(self._door.stop(), self._loop)
            try:
                stopping.result(timeout_s + self.config.shutdown_grace_s)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> FrontDoor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
