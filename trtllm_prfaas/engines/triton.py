"""An engine whose work is done by a remote Triton serving TensorRT-LLM's ``llmapi`` model.

``TritonEngine`` gives a worker the engine surface of ``engines/base.py`` over KServe v2 gRPC,
speaking the ``llmapi`` model's own tensor contract (NVIDIA/TensorRT-LLM
``triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt`` and ``1/model.py``; the test fake
``tests/fakes/llmapi_triton.py`` records file, commit and symbol for each rule):

- in: ``text_input`` (BYTES [1]: the prompt ids decoded with the served model's tokenizer, which
  Triton's TensorRT-LLM re-encodes with ``add_special_tokens=True``), ``sampling_param_max_tokens``
  (INT32), ``sampling_param_temperature`` (FP32) and ``sampling_param_seed`` (UINT64) when
  sampling (greedy sends neither: TensorRT-LLM's default), ``return_finish_reason=True``, and
  ``streaming=True`` only to a decoupled model. The model's decoupled policy is read from Triton
  (``ModelConfig``) at start: the prefill model is not decoupled, so each request is one unary
  ``ModelInfer``; the decode model is, so each request is its own ``ModelStreamInfer`` call.
  There is no ``input_ids``/``output_ids``, and request parameters are never read by the model.
- out: ``text_output`` is the CUMULATIVE generated text; ``CumulativeText`` turns it into exact new
  token ids with the same tokenizer (tokens of completed words stream; the rest comes with the
  final response). ``finish_reason``: "stop"/"length" as sent, "cancelled" -> "aborted",
  "timeout" -> an error output (``DeadlineExceeded``); the final streamed response carries
  ``triton_final_response``.
- plans: a request with a ``Plan`` has it posted to the connector inside Triton (its plan server,
  per ``docs/design/trtllm_path.md`` section 3) and acknowledged before the request is sent,
  checked against the tokens Triton will see: ``encode(decode(ids))`` (``engines/remote_plans.py``
  says when a plan is skipped, counted and logged). ``transfer_status`` asks every rank.

Limits of text I/O (documented, not fixable here): output ids are the re-encoding of the model's
text, so a non-canonical tokenization by the model, or a multi-byte character cut by
``max_tokens``, yields ids other than the model's; ``ignore_eos`` and ``num_skipped_draws`` have
no ``llmapi`` input, so they are not honoured (seeded sampling is TensorRT-LLM's own, not the
reference engine's).

Errors: an unreachable or not-ready server fails the constructor with ``EngineError`` within
``connect_timeout_s``; a request's failure (gRPC status, in-stream ``error_message``, deadline)
ends that request with an error output (``DeadlineExceeded`` for deadlines) and never raises from
``step()``. Each call has its own gRPC deadline (``request_timeout_s``); ``abort`` cancels the call
and Triton's ``llmapi`` model aborts the request in TensorRT-LLM.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import serialize_byte_tensor

from trtllm_prfaas.connector.plans import Plan
from trtllm_prfaas.engines.base import EngineDescriptor, LoopBridge, RemoteFlights, remaining_s
from trtllm_prfaas.engines.hf_tokenizer import CumulativeText, HfTokenizer
from trtllm_prfaas.engines.remote_plans import RemotePlans
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.errors import (
    ConfigError,
    DeadlineExceeded,
    EngineError,
    InvalidRequestError,
    PrfaasError,
)
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus
from trtllm_prfaas.transport.config import RelaySecurity

__all__ = ["TritonEngine", "TritonEngineConfig"]

log = get_logger(__name__)

_FINAL = "triton_final_response"
_MAX_MESSAGE_BYTES = 2**31 - 1
_DEADLINE_SLACK_S = 0.05  # an in-stream error this close to the deadline is the deadline
_REASONS = {"stop": "stop", "length": "length", "cancelled": "aborted"}  # upstream -> ours


@dataclass(frozen=True)
class TritonEngineConfig:
    url: str  # "host:port" of Triton's gRPC endpoint
    tokenizer_dir: str = ""  # the served model's Hugging Face directory (model.yaml ``model``)
    model_name: str = "tensorrt_llm"
    model_version: str = ""
    connect_timeout_s: float = 5.0  # the constructor's readiness check
    request_timeout_s: float = 300.0  # each request's gRPC deadline
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
    # The connector's plan servers inside Triton, in rank order (empty: plans are not carried).
    plan_endpoints: tuple[str, ...] = ()
    plan_security: RelaySecurity | None = field(default=None, repr=False)
    plan_timeout_s: float = 2.0  # a post's acknowledgement, a status query's answers

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("TritonEngineConfig.url must be host:port")
        for name in ("connect_timeout_s", "request_timeout_s", "max_batch_size",
                     "tokens_per_block", "max_in_flight", "poll_interval_s",
                     "max_seq_len", "plan_timeout_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ConfigError(f"TritonEngineConfig.{name} must be > 0")
        for name in ("num_blocks_hint", "kv_bytes_per_token", "kv_state_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TritonEngineConfig.{name} must be >= 0")
        if self.plan_endpoints and self.plan_security is None:
            raise ConfigError("TritonEngineConfig.plan_endpoints need plan_security")


@dataclass
class _Flight:
    request_id: int
    num_blocks: int
    deadline: float
    text: CumulativeText
    task: Future[None] | None = None  # the request's coroutine on the loop
    num_seen: int = 0


class TritonEngine(RemoteFlights):
    """Requests to a remote Triton ``llmapi`` model, tokens back; a context manager."""

    def __init__(self, config: TritonEngineConfig) -> None:
        if not config.tokenizer_dir:
            raise ConfigError(
                "TritonEngine needs tokenizer_dir: the served model's Hugging Face directory "
                "(the llmapi model speaks text; ids are turned into text and back with it)"
            )
        self.config = config
        self.tokenizer = HfTokenizer.from_dir(config.tokenizer_dir)
        self._control_timeout_s = config.connect_timeout_s
        self.connector = None  # the connector runs inside Triton
        self.decoupled = False  # read from Triton's model config by _connect
        self._flights: dict[int, _Flight] = {}
        self._ids = itertools.count(1)
        self._calls: dict[int, Any] = {}
        self._channel: Any = None
        self.plans = RemotePlans(config.plan_endpoints, config.plan_security, config.plan_timeout_s)
        self._bridge = LoopBridge("triton-engine")
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
        plan: Plan | None = None,
    ) -> int:
        """Post the plan (if any, acknowledged first), then start the request; the server's
        refusals arrive as an error output."""
        rid, num_blocks = self._admit(prompt_token_ids, sampling, request_id)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(f"request {rid}: a token id is outside the vocabulary")
        text = self.tokenizer.decode(prompt_token_ids)
        if plan is not None:
            self.plans.submit(plan, self.tokenizer.encode(text), rid)
        request = self._infer_request(rid, text, sampling)
        deadline = time.monotonic() + self.config.request_timeout_s
        flight = _Flight(rid, num_blocks, deadline, CumulativeText(self.tokenizer))
        self._flights[rid] = flight
        run = self._stream(flight, request) if self.decoupled else self._unary(flight, request)
        flight.task = self._bridge.submit(run)
        return rid

    def transfer_status(self, transfer_uuid: str, num_tokens: int) -> InboundStatus | None:
        """The transfer of ``num_tokens`` claimed tokens, over every rank of the connector inside
        Triton (None: unknown everywhere, or the ranks cannot be asked)."""
        return self.plans.transfer_status(transfer_uuid, num_tokens)

    def load_outcome(self, transfer_uuid: str, num_tokens: int) -> str:
        """``loaded``, ``load_failed`` or ``unclaimed``: what the connector inside Triton did
        with a decode's transfer (``RemotePlans.load_outcome``), asked at its first token."""
        return self.plans.load_outcome(transfer_uuid, num_tokens)

    def close(self) -> None:
        """Cancel every call, close the channel and plan client, join the loop. Idempotent."""
        for request_id in list(self._flights):
            self.abort(request_id)
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._bridge.call(channel.close(), self.config.connect_timeout_s)
        self._bridge.close()
        self.plans.close()

    def __enter__(self) -> TritonEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- request encoding
    def _infer_request(self, rid: int, text: str, sampling: SamplingParams) -> Any:
        cfg = self.config
        request = service_pb2.ModelInferRequest(
            model_name=cfg.model_name, model_version=cfg.model_version, id=str(rid)
        )
        _add_input(request, "text_input", "BYTES", np.asarray([text.encode()], dtype=np.object_))
        _add_input(request, "sampling_param_max_tokens", "INT32",
                   np.asarray([sampling.max_tokens], dtype=np.int32))  # fmt: skip
        if sampling.temperature > 0:  # greedy is TensorRT-LLM's default: send nothing
            _add_input(request, "sampling_param_temperature", "FP32",
                       np.asarray([sampling.temperature], dtype=np.float32))  # fmt: skip
            _add_input(request, "sampling_param_seed", "UINT64",
                       np.asarray([sampling.seed], dtype=np.uint64))  # fmt: skip
        _add_input(request, "return_finish_reason", "BOOL", np.asarray([True], dtype=np.bool_))
        if self.decoupled:
            _add_input(request, "streaming", "BOOL", np.asarray([True], dtype=np.bool_))
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
        timeout = cfg.connect_timeout_s
        try:
            ready = await self._stub.ModelReady(
                service_pb2.ModelReadyRequest(name=cfg.model_name, version=cfg.model_version),
                timeout=timeout,
                wait_for_ready=True,  # ride out a server still starting, up to the timeout
            )
            if ready.ready:
                answer = await self._stub.ModelConfig(
                    service_pb2.ModelConfigRequest(name=cfg.model_name, version=cfg.model_version),
                    timeout=timeout,
                )
        except grpc.aio.AioRpcError as exc:
            raise EngineError(
                f"Triton at {cfg.url} is unreachable within {timeout}s: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc
        if not ready.ready:
            raise EngineError(f"Triton at {cfg.url} does not serve a ready {cfg.model_name!r}")
        self.decoupled = bool(answer.config.model_transaction_policy.decoupled)

    async def _unary(self, flight: _Flight, request: Any) -> None:
        """A non-decoupled model: one ``ModelInfer``, one final output."""
        call = self._stub.ModelInfer(request, timeout=remaining_s(flight.deadline))
        await self._guard(flight, call, self._answer(flight, call))

    async def _answer(self, flight: _Flight, call: Any) -> None:
        self._finish(flight, InferResult(await call))

    async def _stream(self, flight: _Flight, request: Any) -> None:
        """A decoupled model: one ``ModelStreamInfer`` call; streamed outputs."""
        call = self._stub.ModelStreamInfer(timeout=remaining_s(flight.deadline))
        await self._guard(flight, call, self._read(flight, call, request))

    async def _read(self, flight: _Flight, call: Any, request: Any) -> None:
        await call.write(request)
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise EngineError(f"request {flight.request_id}: stream ended without a final")
            if response.error_message:
                late = remaining_s(flight.deadline) < _DEADLINE_SLACK_S
                kind = DeadlineExceeded if late else EngineError
                raise kind(f"request {flight.request_id}: Triton: {response.error_message}")
            infer = response.infer_response
            if _FINAL in infer.parameters and infer.parameters[_FINAL].bool_param:
                self._finish(flight, InferResult(infer))
                await call.done_writing()
                return
            new = flight.text.push(_text_of(InferResult(infer)))
            if new:
                flight.num_seen += len(new)
                self._bridge.put(RequestOutput(flight.request_id, new))

    async def _guard(self, flight: _Flight, call: Any, body: Any) -> None:
        """Run one request's call; any failure ends the request with an error output."""
        rid = flight.request_id
        self._calls[rid] = call
        try:
            await body
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

    def _finish(self, flight: _Flight, result: InferResult) -> None:
        """The final response: the remaining tokens and why the request ended."""
        rid = flight.request_id
        reason = _finish_reason(result)
        if reason == "timeout":
            raise DeadlineExceeded(f"request {rid}: TensorRT-LLM timed the request out")
        if reason not in _REASONS:
            raise EngineError(f"request {rid}: unknown finish_reason {reason!r} from Triton")
        text = _text_of(result)
        new, exact = flight.text.finish(text)
        if not exact:
            log.warning("triton_retokenization_diverged", request_id=rid)
        if text.endswith("\ufffd"):  # max_tokens cut a character: its ids cannot travel as text
            log.warning("triton_text_ends_inside_a_character", request_id=rid)
        flight.num_seen += len(new)
        self._bridge.put(RequestOutput(rid, new, True, _REASONS[reason]))

    async def _abort_remote(self, flight: _Flight) -> None:
        """Cancel the request's call (Triton's llmapi model then aborts it in TensorRT-LLM)."""
        call = self._calls.get(flight.request_id)
        if call is not None:
            call.cancel()


def _add_input(request: Any, name: str, datatype: str, array: np.ndarray[Any, Any]) -> None:
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(array.shape)
    if datatype == "BYTES":  # length-prefixed elements, as tritonclient sends them
        request.raw_input_contents.append(serialize_byte_tensor(array).item())
    else:
        request.raw_input_contents.append(array.tobytes())


def _text_of(result: InferResult) -> str:
    text = result.as_numpy("text_output")
    if text is None or text.size == 0:
        raise EngineError("Triton's response has no text_output")
    return bytes(text.reshape(-1)[0]).decode("utf-8")


def _finish_reason(result: InferResult) -> str:
    """The final response's ``finish_reason`` (sent because ``return_finish_reason`` is set)."""
    reason = result.as_numpy("finish_reason")
    if reason is None or reason.size == 0:
        raise EngineError("Triton's final response has no finish_reason")
    return bytes(reason.reshape(-1)[0]).decode()


def _error_for(rid: int, exc: grpc.aio.AioRpcError) -> PrfaasError:
    message = f"request {rid}: Triton {exc.code().name}: {exc.details()}"
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(message)
    if exc.code() is grpc.StatusCode.UNAVAILABLE:
        return EngineError(f"{message} (server unreachable)")
    return EngineError(message)
