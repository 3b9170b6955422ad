"""A fake Triton server serving TensorRT-LLM's ``llmapi`` model, rebuilt from upstream's source.

It is a real KServe v2 gRPC server (grpcio with the stubs shipped in ``tritonclient.grpc``) on
127.0.0.1, serving one model ``tensorrt_llm``. Behind it a tiny deterministic "LLM" generates
token ids over a real Hugging Face tokenizer (``tests/fakes/tokenizer.py``), so text in -> tokens
-> text out is real. Three layers (Triton core: ``triton_core.py``; the ``llmapi`` model and the
LLM: ``llmapi_model.py``; the gRPC front end: here). What each does, and where it comes from:

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
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.fakes.llmapi_model import (
    INPUTS,
    MODEL_NAME,
    OUTPUTS,
    FakeLlm,
    ModelError,
    convert_request,
    create_response,
    error_response,
    model_config,
)
from tests.fakes.tokenizer import corpus_words
from tests.fakes.triton_core import PROTOCOL_TYPES, CoreError, normalize
from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer

__all__ = ["INPUTS", "MODEL_NAME", "OUTPUTS", "FakeLlm", "FakeLlmapiTriton", "model_config"]

_FINAL = "triton_final_response"


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
            meta.inputs.add(
                name=spec.name, datatype=PROTOCOL_TYPES.get(dtype, dtype), shape=spec.dims
            )
        for spec in config.output:
            dtype = mc.DataType.Name(spec.data_type).removeprefix("TYPE_")
            meta.outputs.add(
                name=spec.name, datatype=PROTOCOL_TYPES.get(dtype, dtype), shape=spec.dims
            )
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
        except CoreError as exc:
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
            except CoreError as exc:
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
        ``CoreError`` before any item)."""
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
