"""TensorRT-LLM's ``llmapi`` Triton model (``1/model.py``, ``1/helpers.py``, ``config.pbtxt``) and
a deterministic stand-in for the ``LLM`` behind it, as the llmapi fake needs them (sources: the
docstring of ``tests/fakes/llmapi_triton.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from trtllm_prfaas.engines.hf_tokenizer import HfTokenizer

__all__ = [
    "INPUTS",
    "MODEL_NAME",
    "OUTPUTS",
    "Completion",
    "FakeLlm",
    "LlmapiRequest",
    "ModelError",
    "convert_request",
    "create_response",
    "error_response",
    "model_config",
]

MODEL_NAME = "tensorrt_llm"
# Transcribed here from upstream, not imported from the product's own table
# (``trtllm_prfaas.deploy.contract``), so the fake stays a witness of upstream: a test checks the
# product's table against this one (tests/fakes/test_llmapi_triton.py).
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
