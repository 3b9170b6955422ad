"""An engine whose work is done by a remote Triton server (TensorRT-LLM ``llmapi`` model).

``TritonEngine`` gives a worker the engine surface of ``engines/base.py`` over KServe v2 gRPC,
using the stubs and result parser shipped in ``tritonclient.grpc``. The PrfaaS connector runs
inside that Triton (loaded by TensorRT-LLM from ``model.yaml``) and does the relay itself; this
process only sends requests and streams tokens back.

Each request is its own decoupled ``ModelStreamInfer`` call on one shared channel, so it has its
own gRPC deadline (``request_timeout_s``) and is cancelled alone (``abort`` cancels the call; the
server cancels the request in its engine). Inputs are the ``llmapi`` model's: ``input_ids``
(INT32) or ``text_input`` (BYTES, via ``tokenizer.decode``), ``sampling_param_max_tokens``,
``sampling_param_temperature``, ``sampling_param_seed``, ``streaming=True``. Outputs: ``output_ids``
when the server sends them (the project's front door does), else ``text_output`` re-encoded with
``tokenizer.encode``; the last response carries ``triton_final_response``.

Errors: an unreachable or not-ready server fails the constructor with ``EngineError`` within
``connect_timeout_s``; a request's failure (in-stream ``error_message``, gRPC status, deadline)
ends that request with an error output (``DeadlineExceeded`` for deadlines) and never raises
from ``step()``.

Per-request PrfaaS params travel as the request parameter ``prfaas_connector_params`` (base64 of
``encode_connector_params``). Unverified without a GPU, and a required change there: NVIDIA's
``llmapi`` ``model.py`` ignores request parameters; it must pass this one to ``generate_async`` as
``DisaggregatedParams(opaque_state=...)`` (see ``engines/trtllm.py``). Re-encoding streamed text
chunks is exact only for tokenizers whose text round-trips per chunk (the byte tokenizer does).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from trtllm_prfaas.engines.base import (
    EngineDescriptor,
    LoopBridge,
    RemoteFlights,
    remaining_s,
)
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.engines.trtllm import encode_connector_params
from trtllm_prfaas.errors import (
    ConfigError,
    DeadlineExceeded,
    EngineError,
    InvalidRequestError,
    PrfaasError,
)

__all__ = ["CONNECTOR_PARAMS_PARAMETER", "TritonEngine", "TritonEngineConfig"]

CONNECTOR_PARAMS_PARAMETER = "prfaas_connector_params"
_FINAL = "triton_final_response"
_MAX_MESSAGE_BYTES = 2**31 - 1
_DEADLINE_SLACK_S = 0.05  # an in-stream error this close to the deadline is the deadline


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TritonEngineConfig:
    url: str  # "host:port" of Triton's gRPC endpoint
    model_name: str = "tensorrt_llm"
    model_version: str = ""
    connect_timeout_s: float = 5.0  # the constructor's readiness check
    request_timeout_s: float = 300.0  # each request's gRPC deadline
    send_token_ids: bool = True  # input_ids; False: text_input (needs a tokenizer)
    max_batch_size: int = 20  # for load reports: the server's batch slots
    num_blocks_hint: int = 0  # for load reports only
    tokens_per_block: int = 32
    # What a worker advertises (``descriptor``): the served model.yaml's values, not queried.
    model_id: str = ""  # empty: model_name
    max_seq_len: int = 132096  # model.yaml max_seq_len (the rendered presets' value)
    kv_bytes_per_token: int = 0  # 0: unknown (the router then sizes KV by token count alone)
    kv_state_bytes: int = 0
    max_in_flight: int = 1024
    poll_interval_s: float = 0.01

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("TritonEngineConfig.url must be host:port")
        for name in ("connect_timeout_s", "request_timeout_s", "max_batch_size",
                     "tokens_per_block", "max_in_flight", "poll_interval_s",
                     "max_seq_len"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ConfigError(f"TritonEngineConfig.{name} must be > 0")
        for name in ("num_blocks_hint", "kv_bytes_per_token", "kv_state_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TritonEngineConfig.{name} must be >= 0")


@dataclass
class _Flight:
    request_id: int
    num_blocks: int
    deadline: float
    task: Future[None] | None = None  # the request's coroutine on the loop
    num_seen: int = 0


class TritonEngine(RemoteFlights):
    """Requests to a remote Triton, tokens back; a context manager (``close()`` joins)."""

    def __init__(self, config: TritonEngineConfig, tokenizer: Tokenizer | None = None) -> None:
        if not config.send_token_ids and tokenizer is None:
            raise ConfigError("send_token_ids=False needs a tokenizer for text_input")
        self.config, self.tokenizer = config, tokenizer
        self._control_timeout_s = config.connect_timeout_s
        self.connector = None  # the connector runs inside Triton
        self._flights: dict[int, _Flight] = {}
        self._ids = itertools.count(1)
        self._bridge = LoopBridge("triton-engine")
        self._channel: Any = None
        try:
            self._bridge.call(self._connect(), config.connect_timeout_s + 5.0)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- the worker's surface
    @property
    def descriptor(self) -> EngineDescriptor:
        cfg = self.config
        return EngineDescriptor(
            cfg.model_id or cfg.model_name,
            cfg.max_seq_len,
            cfg.tokens_per_block,
            cfg.num_blocks_hint,
            cfg.max_batch_size,
            kv_bytes_per_token=cfg.kv_bytes_per_token,
            kv_state_bytes=cfg.kv_state_bytes,
        )

    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: int | None = None,
        connector_params: dict[str, Any] | None = None,
    ) -> int:
        """Start the request's stream; the server's refusals arrive as an error output."""
        rid, num_blocks = self._admit(prompt_token_ids, sampling, request_id)
        request = self._infer_request(rid, prompt_token_ids, sampling, connector_params)
        deadline = time.monotonic() + self.config.request_timeout_s
        flight = _Flight(rid, num_blocks, deadline)
        self._flights[rid] = flight
        flight.task = self._bridge.submit(self._run(flight, request))
        return rid

    def close(self) -> None:
        """Cancel every call, close the channel, stop and join the loop thread. Idempotent."""
        for request_id in list(self._flights):
            self.abort(request_id)
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._bridge.call(channel.close(), self.config.connect_timeout_s)
        self._bridge.close()

    def __enter__(self) -> TritonEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- request encoding
    def _infer_request(
        self,
        rid: int,
        prompt: list[int],
        sampling: SamplingParams,
        connector_params: dict[str, Any] | None,
    ) -> Any:
        cfg = self.config
        request = service_pb2.ModelInferRequest(
            model_name=cfg.model_name, model_version=cfg.model_version, id=str(rid)
        )
        if cfg.send_token_ids:
            _add_input(request, "input_ids", "INT32", np.asarray(prompt, dtype=np.int32))
        else:
            assert self.tokenizer is not None
            text = np.asarray([self.tokenizer.decode(prompt).encode()], dtype=np.object_)
            _add_input(request, "text_input", "BYTES", text)
        _add_input(request, "sampling_param_max_tokens", "INT32",
                   np.asarray([sampling.max_tokens], dtype=np.int32))  # fmt: skip
        _add_input(request, "sampling_param_temperature", "FP32",
                   np.asarray([sampling.temperature], dtype=np.float32))  # fmt: skip
        _add_input(request, "sampling_param_seed", "UINT64",
                   np.asarray([sampling.seed], dtype=np.uint64))  # fmt: skip
        _add_input(request, "streaming", "BOOL", np.asarray([True], dtype=np.bool_))
        if connector_params:
            blob = base64.b64encode(encode_connector_params(connector_params)).decode()
            request.parameters[CONNECTOR_PARAMS_PARAMETER].string_param = blob
        return request

    # ---------------------------------------------------------------- on the loop thread
    async def _connect(self) -> None:
        cfg = self.config
        self._channel = grpc.aio.insecure_channel(
            cfg.url,
            options=[("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                     ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)],
        )  # fmt: skip
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._calls: dict[int, Any] = {}
        timeout = cfg.connect_timeout_s
        try:
            ready = await self._stub.ModelReady(
                service_pb2.ModelReadyRequest(name=cfg.model_name, version=cfg.model_version),
                timeout=timeout,
                wait_for_ready=True,  # ride out a server still starting, up to the timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise EngineError(
                f"Triton at {cfg.url} is unreachable within {timeout}s: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc
        if not ready.ready:
            raise EngineError(f"Triton at {cfg.url} does not serve a ready {cfg.model_name!r}")

    async def _run(self, flight: _Flight, request: Any) -> None:
        rid = flight.request_id
        call = self._stub.ModelStreamInfer(timeout=remaining_s(flight.deadline))
        self._calls[rid] = call
        try:
            await call.write(request)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    raise EngineError(f"request {rid}: Triton ended the stream without a final")
                if self._handle(flight, response):
                    await call.done_writing()
                    return
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.CANCELLED and rid not in self._flights:
                return  # aborted by us
            self._bridge.put(RequestOutput(rid, [], True, "error", _error_for(rid, exc)))
        except PrfaasError as exc:
            self._bridge.put(RequestOutput(rid, [], True, "error", exc))
        except Exception as exc:  # never silent: the request ends with the cause
            error = EngineError(f"request {rid}: bad response from Triton: {exc!r}")
            self._bridge.put(RequestOutput(rid, [], True, "error", error))
        finally:
            self._calls.pop(rid, None)

    def _handle(self, flight: _Flight, response: Any) -> bool:
        """Turn one stream response into an output; True when it was the final one."""
        rid = flight.request_id
        if response.error_message:
            # A server that enforces our gRPC deadline itself answers in-stream just before it.
            late = remaining_s(flight.deadline) < _DEADLINE_SLACK_S
            kind = DeadlineExceeded if late else EngineError
            raise kind(f"request {rid}: Triton: {response.error_message}")
        infer = response.infer_response
        final = bool(infer.parameters[_FINAL].bool_param) if _FINAL in infer.parameters else False
        new = self._tokens_of(InferResult(infer))
        flight.num_seen += len(new)
        if final:
            self._bridge.put(RequestOutput(rid, new, True, _finish_reason(InferResult(infer))))
        elif new:
            self._bridge.put(RequestOutput(rid, new))
        return final

    def _tokens_of(self, result: InferResult) -> list[int]:
        ids = result.as_numpy("output_ids")
        if ids is not None:
            return [int(t) for t in ids.reshape(-1)]
        text = result.as_numpy("text_output")
        if text is None:
            return []
        if self.tokenizer is None:
            raise EngineError("Triton sent text_output only; TritonEngine needs a tokenizer")
        return self.tokenizer.encode("".join(bytes(t).decode() for t in text.reshape(-1)))

    async def _abort_remote(self, flight: _Flight) -> None:
        """Cancel the request's call (the server cancels it in its engine)."""
        call = self._calls.get(flight.request_id)
        if call is not None:
            call.cancel()


def _add_input(request: Any, name: str, datatype: str, array: np.ndarray[Any, Any]) -> None:
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(array.shape)
    if datatype == "BYTES":  # length-prefixed elements, as tritonclient sends them
        serialized = serialize_byte_tensor(array)
        request.raw_input_contents.append(serialized.item() if serialized.size else b"")
    else:
        request.raw_input_contents.append(array.tobytes())


def _finish_reason(result: InferResult) -> str:
    reason = result.as_numpy("finish_reason")
    if reason is None or reason.size == 0:
        return "stop"
    text = bytes(reason.reshape(-1)[0]).decode()
    return text or "stop"


def _error_for(rid: int, exc: grpc.aio.AioRpcError) -> PrfaasError:
    message = f"request {rid}: Triton {exc.code().name}: {exc.details()}"
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(message)
    if exc.code() is grpc.StatusCode.UNAVAILABLE:
        return EngineError(f"{message} (server unreachable)")
    return EngineError(message)
