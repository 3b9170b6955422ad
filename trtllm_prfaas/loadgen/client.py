"""One streamed request over stock ``tritonclient.grpc.aio``, and the server probe before a run.

``send_one`` opens a ModelStreamInfer stream for one request (streams share the client's
channel), keeps its request side open until the final response (``triton_final_response``) so a
server that ends the stream on half-close still answers, and turns whatever happens into one
``RequestRecord``. It never raises for a failed request:

- the RPC failed: the gRPC status code name (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ...);
- the server answered with an in-stream ``error_message`` (Triton's decoupled errors carry no
  status code): ``IN_STREAM_ERROR``;
- no final response within ``timeout_s`` (the gRPC deadline, with an asyncio backstop):
  ``DEADLINE_EXCEEDED``; the stream ended without a final response: ``INCOMPLETE``;
- anything else raised on the client side: ``CLIENT_ERROR``.

If the task is cancelled (the run's deadline), a ``CANCELLED`` record goes to the sink before
``CancelledError`` propagates, so every sent request is accounted for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from trtllm_prfaas.loadgen.stats import OK, RequestRecord

__all__ = [
    "RequestSpec",
    "ServerInfo",
    "StreamedIds",
    "is_final",
    "probe",
    "send_one",
    "stream_request",
    "stream_request_of",
]

FINAL_RESPONSE_PARAM = "triton_final_response"
_BACKSTOP_S = 1.0  # the asyncio deadline trails the gRPC one, in case the latter never fires
_DRAIN_S = 1.0  # after the final response, how long the stream may take to end cleanly
# ModelConfig parameters a server may use to announce its max length (string values).
_MAX_PROMPT_PARAMS = ("max_input_len", "max_prompt_tokens")
_MAX_SEQ_PARAMS = ("max_seq_len",)


@dataclass(frozen=True)
class ServerInfo:
    """What the probe learned about the served model."""

    has_input_ids: bool  # accepts ``input_ids``
    has_output_ids: bool  # returns ``output_ids`` (exact token counts)
    max_prompt_tokens: int | None  # announced in ModelConfig parameters, else None


@dataclass(frozen=True)
class RequestSpec:
    """One request's inputs: ``prompt`` is text or token ids."""

    index: int
    num_prompt_tokens: int
    prompt: str | list[int]
    max_tokens: int
    temperature: float
    seed: int


async def probe(client: Any, model: str, max_tokens: int, timeout_s: float) -> ServerInfo:
    """Read the model's metadata and config; raises InferenceServerException when unreachable
    or the model is not served. A max sequence length is turned into a prompt length by
    subtracting ``max_tokens``."""
    meta = await client.get_model_metadata(model, as_json=True, client_timeout=timeout_s)
    config = await client.get_model_config(model, as_json=True, client_timeout=timeout_s)
    params = config.get("config", {}).get("parameters", {})
    announced: int | None = None
    for key in (*_MAX_PROMPT_PARAMS, *_MAX_SEQ_PARAMS):
        value = params.get(key, {}).get("string_value", "")
        if value.strip().isdigit():
            announced = int(value) - (max_tokens if key in _MAX_SEQ_PARAMS else 0)
            break
    return ServerInfo(
        has_input_ids=any(i["name"] == "input_ids" for i in meta.get("inputs", [])),
        has_output_ids=any(o["name"] == "output_ids" for o in meta.get("outputs", [])),
        max_prompt_tokens=announced,
    )


def build_inputs(spec: RequestSpec) -> list[InferInput]:
    """The llmapi model's inputs for ``spec``, streaming on."""
    if isinstance(spec.prompt, str):
        prompt = _tensor("text_input", "BYTES", np.array([spec.prompt.encode()], dtype=object))
    else:
        prompt = _tensor("input_ids", "INT32", np.array(spec.prompt, dtype=np.int32))
    return [
        prompt,
        _tensor("sampling_param_max_tokens", "INT32", np.array([spec.max_tokens], np.int32)),
        _tensor("sampling_param_temperature", "FP32", np.array([spec.temperature], np.float32)),
        _tensor("sampling_param_seed", "UINT64", np.array([spec.seed], np.uint64)),
        _tensor("streaming", "BOOL", np.array([True], dtype=bool)),
    ]


def _tensor(name: str, datatype: str, array: Any) -> InferInput:
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def stream_request_of(
    model: str, spec: RequestSpec, outputs: list[str], request_id: str | None = None
) -> dict[str, Any]:
    """The one request of a ``stream_infer`` stream: ``spec``'s inputs, ``outputs`` asked for."""
    request = {"model_name": model, "inputs": build_inputs(spec),
               "outputs": [InferRequestedOutput(name) for name in outputs]}  # fmt: skip
    if request_id is not None:
        request["request_id"] = request_id
    return request


def is_final(result: Any) -> bool:
    """Whether ``result`` is a stream's last response (Triton's ``triton_final_response``)."""
    params = result.get_response().parameters
    return FINAL_RESPONSE_PARAM in params and bool(params[FINAL_RESPONSE_PARAM].bool_param)


async def stream_request(
    client: Any, request: dict[str, Any], add: Callable[[Any], bool], timeout_s: float
) -> tuple[str, str]:
    """Stream ``request`` (see :func:`stream_request_of`) and hand each response to ``add``,
    which returns True for the final one. Returns ``(OK, "")`` or the status and reason of the
    failure (the module docstring's list); never raises but ``CancelledError``."""
    try:
        async with asyncio.timeout(timeout_s + _BACKSTOP_S):
            return await _stream(client, request, add, timeout_s)
    except TimeoutError:
        return "DEADLINE_EXCEEDED", f"no final response within {timeout_s:g}s"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, str(exc.details())
    except InferenceServerException as exc:
        return str(exc.status() or "CLIENT_ERROR").removeprefix("StatusCode."), str(exc.message())
    except Exception as exc:  # counted, never raised: one bad request must not end the run
        return "CLIENT_ERROR", f"{type(exc).__name__}: {exc}"


async def send_one(
    client: Any,
    model: str,
    spec: RequestSpec,
    info: ServerInfo,
    timeout_s: float,
    sink: Callable[[RequestRecord], None],
) -> None:
    """Stream ``spec`` and hand its record to ``sink`` (see the module docstring)."""
    outputs = ["text_output", *(["output_ids"] if info.has_output_ids else [])]
    request = stream_request_of(model, spec, outputs, str(spec.index))
    tally = _Tally(spec, time.monotonic(), info.has_output_ids)
    try:
        status, reason = await stream_request(client, request, tally.add, timeout_s)
    except asyncio.CancelledError:
        sink(tally.record("CANCELLED", "the run's deadline passed before the final response"))
        raise
    sink(tally.record(status, reason))


class StreamedIds:
    """The ``add`` of :func:`stream_request` for a caller that keeps the output ids (a
    benchmark that checks tokens): the ids, and when the first and second arrived (monotonic;
    the second is when a decode node's first token is out, where the first may come from a
    prefill leg)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.first_at: float | None = None
        self.second_at: float | None = None

    def add(self, result: Any) -> bool:
        new = result.as_numpy("output_ids")
        if new is not None and new.size:
            now = time.monotonic()
            self.first_at = now if self.first_at is None else self.first_at
            self.ids += [int(t) for t in new.reshape(-1)]
            if self.second_at is None and len(self.ids) >= 2:
                self.second_at = now
        return is_final(result)


async def _stream(
    client: Any, request: dict[str, Any], add: Callable[[Any], bool], timeout_s: float
) -> tuple[str, str]:
    done = asyncio.Event()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield request
        await done.wait()  # half-close only once the answer is complete

    responses = client.stream_infer(requests(), stream_timeout=timeout_s)
    try:
        async for result, error in responses:
            if error is not None:
                return "IN_STREAM_ERROR", str(error.message())
            if add(result):
                done.set()  # let the stream end cleanly rather than cancel it
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_DRAIN_S):
                        await _drain(responses)
                return OK, ""
        return "INCOMPLETE", "the stream ended without a final response"
    finally:
        done.set()
        responses.cancel()  # a no-op once the stream has ended


async def _drain(responses: Any) -> None:
    async for _ in responses:
        pass


class _Tally:
    """Token arrivals of one request, on the monotonic clock."""

    def __init__(self, spec: RequestSpec, sent_at: float, has_output_ids: bool) -> None:
        self.spec, self.sent_at, self.has_output_ids = spec, sent_at, has_output_ids
        self.num_tokens = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.finished_at: float | None = None

    def add(self, result: Any) -> bool:
        """Count ``result``'s tokens; True when it is the final response."""
        now = time.monotonic()
        if self.has_output_ids:
            ids = result.as_numpy("output_ids")
            num = 0 if ids is None else int(ids.size)
        else:  # text only: one token per non-empty response (exact for per-token streams)
            text = result.as_numpy("text_output")
            num = int(text is not None and text.size > 0 and len(text.reshape(-1)[0]) > 0)
        if num:
            self.first_at = now if self.first_at is None else self.first_at
            self.last_at = now
            self.num_tokens += num
        final = is_final(result)
        if final:
            self.finished_at = now
        return final

    def record(self, status: str, reason: str) -> RequestRecord:
        finished_at = self.finished_at if status == OK and self.finished_at else time.monotonic()
        return RequestRecord(
            index=self.spec.index,
            num_prompt_tokens=self.spec.num_prompt_tokens,
            sent_at=self.sent_at,
            finished_at=finished_at,
            status=status,
            reason=reason,
            num_output_tokens=self.num_tokens,
            first_token_at=self.first_at,
            last_token_at=self.last_at,
        )
