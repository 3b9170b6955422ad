"""The front door's RPC handlers: KServe v2 over the stubs shipped in ``tritonclient.grpc``.

The servicer (hosted by ``frontdoor.py``'s ``grpc.aio`` server) serves two models over one
orchestrator (``served_models.py``): Triton's TensorRT-LLM ``llmapi`` model (named by the
orchestrator, ``tensorrt_llm`` by default; cumulative streamed text) and the classic
``inflight_batcher_llm`` ``ensemble`` (per-response streamed text). RPCs: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer (the whole text
in one response; Triton itself refuses unary calls to decoupled models, the front door answers
them) and ModelStreamInfer (decoupled: one response per token chunk as tokens arrive, each with
the ``triton_final_response`` parameter, true on the last; a failed request gets one in-stream
``error_message``; several requests may share a stream and run concurrently).

Error mapping (one boundary, ``status_for``, reading ``vocabulary.ERROR_KINDS``): bad input ->
INVALID_ARGUMENT, unknown model -> NOT_FOUND, ``AdmissionRejected`` and ``WorkerLost`` (a worker
died under the request) -> UNAVAILABLE, ``DeadlineExceeded`` and ``TransferTimeout`` ->
DEADLINE_EXCEEDED, any other failure -> INTERNAL. The details name what was wrong; the server
keeps serving.

Cancellation: a client that cancels (or a server shutdown) cancels the handler task; the
orchestrator's generator is closed (``aclosing``) and cancels the request in its engines.

Deadlines: each request gets ``min(config.request_timeout_s, the client's gRPC deadline)``.
The front door always asks the orchestrator for per-token chunks (so TTFT and TPOT are measured
where the client sees them) and joins them for clients that did not ask to stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from trtllm_prfaas.errors import ConfigError, ModelNotFound, PrfaasError
from trtllm_prfaas.router import kserve
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator, TokenChunk
from trtllm_prfaas.router.served_models import Parsed, Reply, ServedModel, served_models
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.vocabulary import kind_of

__all__ = ["FrontDoorConfig", "KServeServicer", "ModelNotFound", "status_for"]

log = get_logger(__name__)

_MAX_GRPC_MESSAGE_BYTES = 2**31 - 1  # INT32_MAX, as Triton and tritonclient use


@dataclass(frozen=True)
class FrontDoorConfig:
    host: str = "127.0.0.1"
    port: int = 8001  # 0 binds a free port; the bound one is reported back
    max_message_bytes: int = _MAX_GRPC_MESSAGE_BYTES
    request_timeout_s: float = 300.0  # deadline of a request whose client sets none
    shutdown_grace_s: float = 1.0
    server_name: str = "trtllm-prfaas"
    server_version: str = "0.1.0"

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"FrontDoorConfig.port {self.port} is out of range")
        if self.request_timeout_s <= 0 or self.max_message_bytes <= 0:
            raise ConfigError("FrontDoorConfig timeouts and sizes must be > 0")


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a failed request ends with (its row in ``vocabulary.ERROR_KINDS``)."""
    return grpc.StatusCode[kind_of(exc).grpc_status]


@dataclass
class _Result:
    """A request's output so far, and the timing its metrics need."""

    started: float
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    def add(self, chunk: TokenChunk) -> None:
        now = time.monotonic()
        if chunk.token_ids and self.first_token_at is None:
            self.first_token_at = now
        if chunk.token_ids:
            self.last_token_at = now
        self.token_ids += chunk.token_ids
        self.text += chunk.text
        self.finish_reason = chunk.finish_reason

    def ttft_s(self) -> float | None:
        """Request received to first token; None when no token came."""
        return None if self.first_token_at is None else self.first_token_at - self.started

    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first; None with fewer than two tokens."""
        if self.first_token_at is None or self.last_token_at is None or len(self.token_ids) < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (len(self.token_ids) - 1)


class KServeServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The RPC handlers; one instance serves every connection on the server's event loop."""

    def __init__(
        self, orchestrator: Orchestrator, config: FrontDoorConfig, metrics: RouterMetrics | None
    ) -> None:
        self.orchestrator = orchestrator
        self.config = config
        self.metrics = metrics
        self.models = served_models(orchestrator.model_name)

    # ------------------------------------------------------------------- health and metadata
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=self.orchestrator.is_ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        ready = self._serves(request.name, request.version) and self.orchestrator.is_ready()
        return service_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(
            name=self.config.server_name, version=self.config.server_version, extensions=[]
        )

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        model = await self._require_model(request.name, request.version, context)
        return kserve.model_metadata(model.name, model.inputs, model.outputs, model.platform,
                                     model.max_batch_size)  # fmt: skip

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        model = await self._require_model(request.name, request.version, context)
        config = kserve.model_config(model.name, model.inputs, model.outputs,
                                     backend=model.backend, platform=model.platform,
                                     max_batch_size=model.max_batch_size)  # fmt: skip
        return service_pb2.ModelConfigResponse(config=config)

    def _serves(self, name: str, version: str) -> bool:
        return name in self.models and version in ("", kserve.MODEL_VERSION)

    async def _require_model(self, name: str, version: str, context: Any) -> ServedModel:
        if not self._serves(name, version):
            await context.abort(grpc.StatusCode.NOT_FOUND, str(self._not_found(name, version)))
        return self.models[name]

    def _not_found(self, name: str, version: str) -> ModelNotFound:
        shown = f"{name}" + (f" version {version}" if version else "")
        return ModelNotFound(
            f"model '{shown}' is not found; this server serves "
            f"{' and '.join(repr(m) for m in self.models)} version {kserve.MODEL_VERSION}"
        )

    # ---------------------------------------------------------------------------- inference
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        request_id = uuid.uuid4().hex[:16]
        started = time.monotonic()
        try:
            model, parsed, wanted = self._parse(request, context, request_id)
            result = await self._run(parsed.gen, started)
        except asyncio.CancelledError:
            self._cancelled("ModelInfer", request_id, request.model_name)
            raise
        except Exception as exc:
            message = self._failed(exc, "ModelInfer", request_id, request.model_name)
            await context.abort(status_for(exc), message)
            raise  # unreachable: abort raises
        self._succeeded("ModelInfer", result, model.name)
        reply = Reply(result.token_ids, result.text, result.text, result.finish_reason, False)
        return self._response(model, request, parsed, wanted, reply, None)

    async def ModelStreamInfer(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        responses: asyncio.Queue[Any] = asyncio.Queue()  # None: every request is answered
        tasks: set[asyncio.Task[None]] = set()
        reader = asyncio.create_task(self._read_stream(request_iterator, context, responses, tasks))
        try:
            while (response := await responses.get()) is not None:
                yield response
        finally:  # the client left or the stream ended: cancel whatever still runs
            for task in (reader, *tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)

    async def _read_stream(
        self,
        request_iterator: Any,
        context: Any,
        responses: asyncio.Queue[Any],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        try:
            async for request in request_iterator:
                task = asyncio.create_task(self._stream_one(request, context, responses))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
        finally:
            responses.put_nowait(None)

    async def _stream_one(self, request: Any, context: Any, responses: asyncio.Queue[Any]) -> None:
        """Answer one request of a stream: its chunks, or one in-stream error."""
        request_id = uuid.uuid4().hex[:16]
        started = time.monotonic()
        try:
            model, parsed, wanted = self._parse(request, context, request_id)
            result = _Result(started)
            per_token = dataclasses.replace(parsed.gen, streaming=True)
            async with contextlib.aclosing(self.orchestrator.generate(per_token)) as chunks:
                async for chunk in chunks:
                    result.add(chunk)
                    if parsed.gen.streaming:  # as the client asked: a response per chunk
                        reply = Reply(chunk.token_ids, chunk.text, result.text,
                                      chunk.finish_reason, True)  # fmt: skip
                        response = self._response(model, request, parsed, wanted, reply,
                                                  chunk.is_final)  # fmt: skip
                        responses.put_nowait(_streamed(response))
            if not parsed.gen.streaming:
                reply = Reply(result.token_ids, result.text, result.text, result.finish_reason,
                              False)  # fmt: skip
                response = self._response(model, request, parsed, wanted, reply, True)
                responses.put_nowait(_streamed(response))
        except asyncio.CancelledError:
            self._cancelled("ModelStreamInfer", request_id, request.model_name)
            raise
        except Exception as exc:
            message = self._failed(exc, "ModelStreamInfer", request_id, request.model_name)
            responses.put_nowait(self._stream_error(request, message))
            return
        self._succeeded("ModelStreamInfer", result, model.name)

    def _response(
        self,
        model: ServedModel,
        request: Any,
        parsed: Parsed,
        wanted: tuple[str, ...],
        reply: Reply,
        is_final: bool | None,
    ) -> Any:
        values = model.answer(reply, parsed)
        return kserve.infer_response(model.name, request.id, values, model.output_decls, wanted,
                                     is_final)  # fmt: skip

    def _stream_error(self, request: Any, message: str) -> Any:
        """The in-stream error (tritonclient hands ``error_message`` to the callback)."""
        final = kserve.infer_response(request.model_name, request.id, {}, {}, is_final=True)
        return service_pb2.ModelStreamInferResponse(
            error_message=f"[request id: {request.id}] {message}", infer_response=final
        )

    def _parse(
        self, request: Any, context: Any, request_id: str
    ) -> tuple[ServedModel, Parsed, tuple[str, ...]]:
        """The model asked for, the client's request for it and the outputs it names."""
        if not self._serves(request.model_name, request.model_version):
            raise self._not_found(request.model_name, request.model_version)
        model = self.models[request.model_name]
        deadline_s = self.config.request_timeout_s
        remaining_s = context.time_remaining()
        if remaining_s is not None:
            deadline_s = max(min(deadline_s, float(remaining_s)), 0.0)
        tensors = kserve.decode_inputs(request, model.input_decls)
        parsed = model.parse(tensors, self.orchestrator, request_id, deadline_s)
        log.debug("request_received", request_id=request_id, client_id=request.id,
                  model=model.name,
                  num_prompt_tokens=len(parsed.gen.prompt_token_ids))  # fmt: skip
        return model, parsed, kserve.requested_outputs(request, model.output_decls)

    async def _run(self, gen: GenerateRequest, started: float) -> _Result:
        result = _Result(started)
        per_token = dataclasses.replace(gen, streaming=True)
        async with contextlib.aclosing(self.orchestrator.generate(per_token)) as chunks:
            async for chunk in chunks:
                result.add(chunk)
        return result

    # ------------------------------------------------------------------------ bookkeeping
    def _label(self, model_name: str) -> str:
        """The metrics label of a request for ``model_name`` (unknown names share one label)."""
        return model_name if model_name in self.models else self.orchestrator.model_name

    def _failed(self, exc: Exception, rpc: str, request_id: str, model_name: str) -> str:
        """Log and count a failed request; returns the details the client gets."""
        code = status_for(exc)
        if isinstance(exc, PrfaasError):
            message = str(exc)
            log.info("request_failed", request_id=request_id, rpc=rpc, status=code.name,
                     error=message)  # fmt: skip
        else:  # a bug: keep serving, tell the client it was ours
            message = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("request_crashed", request_id=request_id, rpc=rpc)
        if self.metrics is not None:
            self.metrics.record_frontdoor(self._label(model_name), rpc, code.name)
        return message

    def _cancelled(self, rpc: str, request_id: str, model_name: str) -> None:
        log.info("request_cancelled", request_id=request_id, rpc=rpc)
        if self.metrics is not None:
            self.metrics.record_frontdoor(self._label(model_name), rpc, "CANCELLED")

    def _succeeded(self, rpc: str, result: _Result, model: str) -> None:
        if self.metrics is None:
            return
        self.metrics.record_frontdoor(model, rpc, "OK")
        self.metrics.observe_latency(model, result.ttft_s(), result.tpot_s())


def _streamed(response: Any) -> Any:
    return service_pb2.ModelStreamInferResponse(infer_response=response)
