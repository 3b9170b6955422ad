"""A fake Triton server serving TensorRT-LLM's ``llmapi`` model, rebuilt from upstream's source.

It is a real KServe v2 gRPC server (grpcio with the stubs shipped in ``tritonclient.grpc``) on
127.0.0.1, serving one model ``tensorrt_llm``. Behind it a tiny deterministic "LLM" generates
token ids over a real Hugging Face tokenizer (``tests/fakes/tokenizer.py``), so text in -> tokens
-> text out is real. What each layer does, and where it comes from:

Triton core (triton-inference-server/core ``src/infer_request.cc`` ``InferenceRequest::Normalize``,
stored copy 27947513561, commit 00033b4; message wording of the newer core as asserted by
server ``qa/L0_input_validation/input_validation_test.py``, stored copy 5881158243):
- too few or too many inputs: INVALID_ARGUMENT ``"[request id: <id>] expected number of inputs
  between R and N but got M inputs for model 'tensorrt_llm'. Got input(s) [...], but missing
  required input(s) [...]. Please provide all required input(s)."``. Only the COUNT is checked
  here, so a request that swaps ``text_input`` for another declared input passes to the model.
- an input the config does not declare: INVALID_ARGUMENT ``"unexpected inference input 'X' for
  model 'tensorrt_llm'"`` (``Model::GetInput``, no request-id prefix); a wrong datatype:
  ``"inference input 'X' data-type is 'T', but model 'M' expects 'U'"``; a wrong shape:
  ``"unexpected shape for input 'X' for model 'M'. Expected [..], got [..]. "``. With
  ``max_batch_size: 0`` (upstream ``model.yaml`` ``triton_config``) shapes are the dims as written.
- the request id prefix is ``[request id: <id_unknown>] `` when the request has no id.

Triton gRPC front end (server ``src/grpc/infer_handler.cc`` / ``stream_infer_handler.cc``):
- unary ``ModelInfer`` on a decoupled model: UNIMPLEMENTED ``"ModelInfer RPC doesn't support models
  with decoupled transaction policy"`` (TRITONSERVER_ERROR_UNSUPPORTED);
- ``ModelStreamInfer``: every response carries the ``triton_final_response`` parameter, True on the
  last one, decoupled or not (the audit's reading of stream_infer_handler.cc@e1db8a6 ~line 812); a
  request refused by the core gets one stream message with ``error_message`` only; a model error
  comes as ``error_message`` on the final response [the exact pairing is not re-read: modelled].
- a cancelled call (client cancel or deadline) cancels the request; the model stops generating
  (``model.py`` ``cancellation_loop`` aborts the ``generate_async`` result).

The ``llmapi`` model (NVIDIA/TensorRT-LLM ``triton_backend/all_models/llmapi/tensorrt_llm/``):
- inputs/outputs exactly as ``config.pbtxt`` (stored copy 66255222930, commit 0a71057: the newest;
  1.2-era copies are a subset, without ``image_url`` and the LoRA inputs); ``text_input`` is the
  only required input; no ``input_ids``, no ``output_ids``.
- ``1/model.py`` (commit 044a90d, stored copy 47124951398): ``_convert_request`` reads
  ``text_input[0]`` (a missing one raises "text_input is missing from the request"; a 2-D one "The
  current implementation only supports text_input being a 1D tensor."), ``get_sampling_params_
  from_request`` / ``get_output_config_from_request`` / ``get_streaming_from_request``
  (``1/helpers.py`` commit 0df60f9, stored copy 57857646667: each scalar must have size 1, else
  "Expected a scalar tensor for tensor X"; ``best_of`` defaults to 1; ``return_*`` default False;
  ``streaming`` defaults False); request PARAMETERS are never read.
- ``_execute_single_request``: ``streaming and not self.decoupled`` raises "Streaming is only
  supported in decoupled mode."; any exception becomes one FINAL response with the error
  ``"Error generating request: <e>"`` (``pb_utils.TritonError``: code INTERNAL) and
  ``text_output = ["N/A"]``. Streaming: one response per ``RequestOutput``, FINAL on the finished
  one; non-streaming: one FINAL response with the last output.
- ``_create_response``: ``text_output = output.text`` (generated text only, CUMULATIVE: the whole
  text so far in every streamed response); ``finish_reason`` only when ``return_finish_reason`` is
  true, as ``str(output.finish_reason)`` (so ``"None"`` before the end; ``"stop"``, ``"length"``,
  ``"timeout"``, ``"cancelled"`` at the end); ``stop_reason`` / ``cumulative_logprob`` likewise.
- ``model.yaml`` (commit 0ebb153): ``triton_config.decoupled`` and ``max_batch_size: 0``, applied by
  ``auto_complete_config``; here the ``decoupled`` constructor argument.

The LLM behind it (TensorRT-LLM LLM API, modelled):
- the prompt is tokenized with ``add_special_tokens=True`` (``inputs/registry.py``
  ``DefaultInputProcessor.__call__``, stored copy 60646526203);
- ``SamplingParams.max_tokens`` defaults to 32; greedy when no temperature (or 0) is given, else
  seeded sampling (seed 0 when none);
- prompt + max_tokens above ``max_seq_len`` is refused ("The sum of prompt length (P) and query
  length (0) max_tokens (M) should not exceed max_seq_len (S)": ``llm.py`` ``_check_arguments``,
  wording as quoted by third-party error mappers, not re-read here);
- streamed text is detokenized incrementally with special tokens skipped and tokens whose text
  ends in an incomplete UTF-8 sequence held back until the final flush (``llmapi/tokenizer.py``
  ``TransformersTokenizer.decode_incrementally``, stored copy 315650635); EOS ends with "stop",
  ``max_tokens`` with "length".
- the "model" itself writes words (see ``FakeLlm``): a hash of (seed when sampling, every token
  so far) picks the next word or EOS (probability ``eos_rate``). Deterministic, so tests compute
  the expected output with ``llm.reference()``.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import xxhash
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from tests.fakes.tokenizer import corpus_words
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer

__all__ = ["INPUTS", "MODEL_NAME", "OUTPUTS", "FakeLlm", "FakeLlmapiTriton", "model_config"]

MODEL_NAME = "tensorrt_llm"
_S, _B, _I32, _U64, _F32, _I64 = "STRING", "BOOL", "INT32", "UINT64", "FP32", "INT64"
# (name, TYPE_*, dims, optional) as upstream config.pbtxt (0a71057) declares them, in its order.
INPUTS: tuple[tuple[str, str, tuple[int, ...], bool], ...] = (
    ("text_input", _S, (-1,), False), ("image_url", _S, (-1,), True),
    ("streaming", _B, (1,), True), ("sampling_param_best_of", _I32, (1,), True),
    ("sampling_param_temperature", _F32, (1,), True), ("sampling_param_top_k", _I32, (1,), True),
    ("sampling_param_top_p", _F32, (1,), True),
    ("sampling_param_frequency_penalty", _F32, (1,), True),
    ("sampling_param_presence_penalty", _F32, (1,), True),
    ("sampling_param_max_tokens", _I32, (1,), True), ("sampling_param_stop", _S, (-1,), True),
    ("sampling_param_seed", _U64, (1,), True),
    ("sampling_param_exclude_input_from_output", _B, (1,), True),
    ("sampling_param_return_perf_metrics", _B, (1,), True),
    ("return_finish_reason", _B, (1,), True), ("return_stop_reason", _B, (1,), True),
    ("return_cumulative_logprob", _B, (1,), True), ("stop", _B, (1,), True),
    ("lora_id", _U64, (1,), True), ("lora_name", _S, (1,), True), ("lora_path", _S, (1,), True),
    ("lora_ckpt_source", _S, (1,), True),
)  # fmt: skip
OUTPUTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("text_output", _S, (-1,)), ("finish_reason", _S, (-1,)), ("stop_reason", _S, (-1,)),
    ("cumulative_logprob", _F32, (-1,)), ("kv_cache_reused_block", _I32, (-1,)),
    ("kv_cache_missed_block", _I32, (-1,)), ("kv_cache_alloc_new_blocks", _I32, (-1,)),
    ("kv_cache_alloc_total_blocks", _I32, (-1,)), ("kv_cache_hit_rate", _F32, (-1,)),
    ("arrival_time_ns", _I64, (1,)), ("first_scheduled_time_ns", _I64, (1,)),
    ("first_token_time_ns", _I64, (1,)), ("last_token_time_ns", _I64, (1,)),
    ("acceptance_rate", _F32, (1,)), ("total_accepted_draft_tokens", _I32, (1,)),
    ("total_draft_tokens", _I32, (1,)),
)  # fmt: skip
_PROTOCOL = {"STRING": "BYTES"}  # KServe datatype of a TYPE_*; the others are spelled alike
_NUMPY: dict[str, Any] = {"BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64,
                          "FP32": np.float32, "INT64": np.int64}  # fmt: skip
_FINAL = "triton_final_response"
_DEFAULT_MAX_TOKENS = 32  # tensorrt_llm SamplingParams.max_tokens default


def model_config(decoupled: bool, name: str = MODEL_NAME) -> Any:
    """The model's config after ``auto_complete_config`` (``max_batch_size: 0``)."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    config.model_transaction_policy.decoupled = decoupled
    for input_name, dtype, dims, optional in INPUTS:
        config.input.add(
            name=input_name,
            data_type=mc.DataType.Value(f"TYPE_{dtype}"),
            dims=list(dims),
            optional=optional,
        )
    for output_name, dtype, dims in OUTPUTS:
        config.output.add(
            name=output_name, data_type=mc.DataType.Value(f"TYPE_{dtype}"), dims=list(dims)
        )
    return config


# --------------------------------------------------------------------------- Triton core
class _CoreError(Exception):
    """A request refused before the model sees it (gRPC status + message)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _log_request(request: Any) -> str:
    return f"[request id: {request.id or '<id_unknown>'}] "


def normalize(request: Any, config: Any) -> dict[str, np.ndarray[Any, Any]]:
    """Triton core's checks of one request against the model config; the decoded inputs."""
    declared = {i.name: i for i in config.input}
    names = [t.name for t in request.inputs]
    required = [i.name for i in config.input if not i.optional]
    if not len(required) <= len(names) <= len(declared):
        missing = [n for n in required if n not in names]
        got = "[" + ",".join(f"'{n}'" for n in names) + "]"
        need = "[" + ",".join(f"'{n}'" for n in missing) + "]"
        raise _CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{_log_request(request)}expected number of inputs between {len(required)} and "
            f"{len(declared)} but got {len(names)} inputs for model '{config.name}'. Got "
            f"input(s) {got}, but missing required input(s) {need}. Please provide all "
            "required input(s).",
        )
    decoded = {}
    for index, tensor in enumerate(request.inputs):
        spec = declared.get(tensor.name)
        if spec is None:
            raise _CoreError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unexpected inference input '{tensor.name}' for model '{config.name}'",
            )
        decoded[tensor.name] = _check_tensor(request, index, tensor, spec, config.name)
    return decoded


def _check_tensor(request: Any, index: int, tensor: Any, spec: Any, model: str) -> Any:
    expected = mc.DataType.Name(spec.data_type).removeprefix("TYPE_")
    expected = _PROTOCOL.get(expected, expected)
    prefix = _log_request(request)
    if tensor.datatype != expected:
        raise _CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}inference input '{tensor.name}' data-type is '{tensor.datatype}', but "
            f"model '{model}' expects '{expected}'",
        )
    shape, dims = list(tensor.shape), list(spec.dims)
    if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
        raise _CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}unexpected shape for input '{tensor.name}' for model '{model}'. Expected "
            f"[{','.join(map(str, dims))}], got [{','.join(map(str, shape))}]. ",
        )
    raw = request.raw_input_contents[index] if request.raw_input_contents else b""
    if tensor.datatype == "BYTES":
        array = deserialize_bytes_tensor(raw) if raw else np.asarray([], dtype=np.object_)
    else:
        array = np.frombuffer(raw, dtype=_NUMPY[tensor.datatype])
    count = int(np.prod(shape)) if shape else 1
    if array.size != count:
        raise _CoreError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{prefix}unexpected number of elements for input '{tensor.name}' for model "
            f"'{model}'. Expected {count}, got {array.size}",
        )  # [modelled: Triton reports a byte-size mismatch here]
    return array.reshape(shape)


# --------------------------------------------------------------------------- the "LLM"
@dataclass
class Completion:
    """One ``RequestOutput.outputs[0]`` as the llmapi model reads it."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class FakeLlm:
    """A deterministic stand-in for ``tensorrt_llm.LLM`` over a real HF tokenizer.

    The "model" writes words: whenever the previous word is fully emitted it picks the next one
    (or EOS, with probability ``eos_rate``) by a hash of every token so far (and of the seed when
    sampling), then emits that word's token ids one per step. Words are the corpus's pre-tokens
    that start with a space, so generated text re-encodes to exactly the generated ids (BPE never
    merges across pre-tokens) and multi-byte characters span several steps, as with a real LLM.
    """

    def __init__(
        self,
        tokenizer: HfTokenizer,
        words: list[str],
        eos_rate: float = 0.0,
        max_seq_len: int = 4096,
        token_delay_s: float = 0.0,
    ) -> None:
        self.tokenizer, self.eos_rate = tokenizer, eos_rate
        self.max_seq_len, self.token_delay_s = max_seq_len, token_delay_s
        self._words = [tokenizer.encode(w, add_special_tokens=False) for w in words]

    def next_word(
        self, context: list[int], temperature: float | None, seed: int | None
    ) -> list[int]:
        """The model: a hash of the context (and the seed when sampling) picks the next word."""
        salt = (seed or 0) + 1 if temperature else 0
        h = xxhash.xxh64_intdigest(np.asarray(context, dtype=np.int64).tobytes(), seed=salt)
        if self.tokenizer.eos_id is not None and (h >> 40) % 1000 < self.eos_rate * 1000:
            return [self.tokenizer.eos_id]
        return self._words[h % len(self._words)]

    def generate(
        self,
        prompt: str,
        sampling: dict[str, Any],
        is_cancelled: Callable[[], bool] = lambda: False,
    ) -> Iterator[Completion]:
        """Streamed outputs of one request (cumulative text and ids); the last is finished."""
        context = self.tokenizer.encode(prompt)  # add_special_tokens=True, as upstream
        max_tokens = int(sampling.get("max_tokens") or _DEFAULT_MAX_TOKENS)
        if len(context) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({len(context)}) and query length (0) max_tokens "
                f"({max_tokens}) should not exceed max_seq_len ({self.max_seq_len})"
            )
        temperature, seed = sampling.get("temperature"), sampling.get("seed")
        out: list[int] = []
        pending: list[int] = []
        while True:
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
            if is_cancelled():
                yield Completion(self._text(out, True), list(out), "cancelled")
                return
            if not pending:
                pending = list(self.next_word(context + out, temperature, seed))
            token = pending.pop(0)
            reason = "stop" if token == self.tokenizer.eos_id else None
            if reason is None:
                out.append(token)
                reason = "length" if len(out) >= max_tokens else None
            yield Completion(self._text(out, reason is not None), list(out), reason)
            if reason is not None:
                return

    def _text(self, ids: list[int], final: bool) -> str:
        text = self.tokenizer.decode(ids)  # skip_special_tokens=True
        return text if final else text.rstrip("\ufffd")  # incomplete characters wait for flush

    def reference(
        self,
        prompt: str,
        max_tokens: int = _DEFAULT_MAX_TOKENS,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> Completion:
        """What a request with these sampling params finishes with (for tests' expectations)."""
        sampling = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        *_, last = self.generate(prompt, sampling)
        return last


# --------------------------------------------------------------------------- model.py
class ModelError(Exception):
    """``pb_utils.TritonModelException`` raised inside the model."""


@dataclass(frozen=True)
class LlmapiRequest:
    prompt: str
    sampling: dict[str, Any]
    streaming: bool
    output_config: dict[str, bool]


def _scalar(inputs: dict[str, Any], name: str) -> Any:
    tensor = inputs.get(name)
    if tensor is None:
        return None
    if tensor.size != 1:
        raise ModelError(f"Expected a scalar tensor for tensor {name}")
    return tensor.reshape(-1)[0].item()


def convert_request(inputs: dict[str, Any]) -> LlmapiRequest:
    """``_convert_request`` with the ``helpers.py`` readers it calls."""
    text_input = inputs.get("text_input")
    if text_input is None:
        raise ModelError("text_input is missing from the request")
    if text_input.ndim > 1:
        raise ModelError("The current implementation only supports text_input being a 1D tensor.")
    prompt = text_input[0]
    prompt = prompt.decode("utf-8") if isinstance(prompt, bytes) else str(prompt)
    sampling: dict[str, Any] = {
        "best_of": 1,
        "exclude_input_from_output": False,
        "return_perf_metrics": False,
    }
    for arg in (
        "best_of",
        "temperature",
        "top_k",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "max_tokens",
        "seed",
        "exclude_input_from_output",
        "return_perf_metrics",
    ):
        value = _scalar(inputs, f"sampling_param_{arg}")
        if value is not None:
            sampling[arg] = value
    sampling["stop"] = inputs.get("sampling_param_stop")
    output_config = {
        key: bool(_scalar(inputs, key) or False)
        for key in ("return_finish_reason", "return_stop_reason", "return_cumulative_logprob")
    }
    return LlmapiRequest(
        prompt, sampling, bool(_scalar(inputs, "streaming") or False), output_config
    )


def create_response(request: Any, completion: Completion, output_config: dict[str, bool]) -> Any:
    """``_create_response``: cumulative ``text_output``; the ``return_*`` outputs on request."""
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version="1", id=request.id
    )
    _add_bytes(response, "text_output", [completion.text.encode("utf-8")])
    if output_config["return_finish_reason"]:
        _add_bytes(response, "finish_reason", [str(completion.finish_reason).encode()])
    if output_config["return_stop_reason"]:
        _add_bytes(response, "stop_reason", [b"None"])
    if output_config["return_cumulative_logprob"]:
        _add_bytes(response, "cumulative_logprob", [b"None"])  # str(None), as upstream
    return response


def _add_bytes(response: Any, name: str, values: list[bytes]) -> None:
    tensor = response.outputs.add(name=name, datatype="BYTES", shape=[len(values)])
    del tensor
    response.raw_output_contents.append(
        serialize_byte_tensor(np.asarray(values, dtype=np.object_)).item()
    )


def error_response(request: Any, message: str) -> Any:
    """The model's error response: ``text_output = ["N/A"]`` beside the error."""
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version="1", id=request.id
    )
    _add_bytes(response, "text_output", [b"N/A"])
    return response, f"Error generating request: {message}"


# --------------------------------------------------------------------------- gRPC server
@dataclass
class _Stats:
    requests: list[Any] = field(default_factory=list)  # every ModelInferRequest received
    num_cancelled: int = 0


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, server: FakeLlmapiTriton) -> None:
        self.server = server

    # -- health and metadata
    def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ModelReadyResponse(
            ready=self.server.serves(request.name, request.version)
        )

    def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(name="triton", version="2.64.0")

    def ModelMetadata(self, request: Any, context: Any) -> Any:
        self._require_model(request.name, request.version, context)
        config = self.server.config
        meta = service_pb2.ModelMetadataResponse(
            name=config.name, versions=["1"], platform="python"
        )
        for spec in config.input:
            dtype = mc.DataType.Name(spec.data_type).removeprefix("TYPE_")
            meta.inputs.add(name=spec.name, datatype=_PROTOCOL.get(dtype, dtype), shape=spec.dims)
        for spec in config.output:
            dtype = mc.DataType.Name(spec.data_type).removeprefix("TYPE_")
            meta.outputs.add(name=spec.name, datatype=_PROTOCOL.get(dtype, dtype), shape=spec.dims)
        return meta

    def ModelConfig(self, request: Any, context: Any) -> Any:
        self._require_model(request.name, request.version, context)
        return service_pb2.ModelConfigResponse(config=self.server.config)

    def _require_model(self, name: str, version: str, context: Any) -> None:
        if not self.server.serves(name, version):
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found"
            )

    # -- inference
    def ModelInfer(self, request: Any, context: Any) -> Any:
        self.server.stats.requests.append(request)
        self._require_model(request.model_name, request.model_version, context)
        if self.server.config.model_transaction_policy.decoupled:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "ModelInfer RPC doesn't support models with decoupled transaction policy",
            )
        last: tuple[Any, str] | None = None
        try:
            for response, error, _final in self.server.execute(request, context.is_active):
                last = (response, error)
        except _CoreError as exc:
            context.abort(exc.code, exc.message)
        assert last is not None
        if last[1]:
            context.abort(grpc.StatusCode.INTERNAL, last[1])
        return last[0]

    def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        done = object()

        def serve_one(request: Any) -> None:
            try:
                for response, error, final in self.server.execute(request, context.is_active):
                    response.parameters[_FINAL].bool_param = final
                    out.put(
                        service_pb2.ModelStreamInferResponse(
                            error_message=error or "", infer_response=response
                        )
                    )
            except _CoreError as exc:
                out.put(service_pb2.ModelStreamInferResponse(error_message=exc.message))
            finally:
                out.put(done)

        def read_all() -> None:
            count = 0
            try:
                for request in request_iterator:
                    self.server.stats.requests.append(request)
                    count += 1
                    threading.Thread(target=serve_one, args=(request,), daemon=True).start()
            except grpc.RpcError:
                pass  # the client went away
            finally:
                out.put(("reader-done", count))

        threading.Thread(target=read_all, daemon=True).start()
        expected, finished = None, 0
        while context.is_active() and (expected is None or finished < expected):
            try:
                item = out.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is done:
                finished += 1
            elif isinstance(item, tuple):
                expected = item[1]
            else:
                yield item


class FakeLlmapiTriton:
    """A Triton serving the ``llmapi`` model on 127.0.0.1:port; a context manager.

    ``decoupled`` is the model.yaml ``triton_config.decoupled`` (prefill: False, decode: True).
    ``stats.requests`` records every request received (tests assert on what was sent).
    ``llm.reference(...)`` gives the output a request will finish with.
    """

    def __init__(
        self,
        tokenizer_dir: str | Path,
        *,
        decoupled: bool,
        words: list[str] | None = None,
        eos_rate: float = 0.0,
        token_delay_s: float = 0.0,
        max_seq_len: int = 4096,
    ) -> None:
        self.config = model_config(decoupled)
        self.tokenizer = HfTokenizer.from_dir(tokenizer_dir)
        words = corpus_words() if words is None else words
        self.llm = FakeLlm(self.tokenizer, words, eos_rate, max_seq_len, token_delay_s)
        self.stats = _Stats()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self._ids = itertools.count(1)
        self._server.start()

    def serves(self, name: str, version: str) -> bool:
        return name == self.config.name and version in ("", "1")

    def execute(
        self, request: Any, is_active: Callable[[], bool]
    ) -> Iterator[tuple[Any, str, bool]]:
        """``(response, error message or "", final)`` items of one request (core checks raise
        ``_CoreError`` before any item)."""
        inputs = normalize(request, self.config)
        try:
            converted = convert_request(inputs)
            if converted.streaming and not self.config.model_transaction_policy.decoupled:
                raise ModelError("Streaming is only supported in decoupled mode.")
            outputs = self.llm.generate(
                converted.prompt, converted.sampling, lambda: not is_active()
            )
            for completion in outputs:
                if completion.finish_reason == "cancelled":
                    self.stats.num_cancelled += 1
                    return
                if converted.streaming or completion.finished:
                    response = create_response(request, completion, converted.output_config)
                    yield response, "", completion.finished
        except (ModelError, ValueError) as exc:
            response, message = error_response(request, str(exc))
            yield response, message, True

    def close(self) -> None:
        """Stop serving (in-flight calls are cancelled) and wait for the server to stop."""
        self._server.stop(grace=0).wait(5.0)

    def __enter__(self) -> FakeLlmapiTriton:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
