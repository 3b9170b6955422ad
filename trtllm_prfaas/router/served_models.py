"""The two models the front door serves, each as upstream Triton declares and answers it.

- ``tensorrt_llm``: TensorRT-LLM's ``llmapi`` Python model (NVIDIA/TensorRT-LLM
  ``triton_backend/all_models/llmapi/tensorrt_llm/1/model.py`` commit 044a90d, stored copy
  47124951398; ``1/helpers.py`` 0df60f9). Tensors: ``contract.LLMAPI_*``, plus the front door's
  ``input_ids`` (token ids in place of ``text_input``) and ``output_ids`` (the tokens each response
  adds). ``text_output`` is the generated text only and CUMULATIVE when streaming
  (``_create_response`` sends ``output.text``); ``finish_reason`` / ``stop_reason`` only when
  ``return_finish_reason`` / ``return_stop_reason`` is true, as ``str(...)`` ("None" before the
  end). ``sampling_param_max_tokens`` defaults to 32 (``SamplingParams.max_tokens``).
- ``ensemble``: the classic ``inflight_batcher_llm`` ensemble (``contract.ENSEMBLE_*``), what
  genai-perf's ``tensorrtllm`` backend and perf_analyzer send. ``max_tokens`` and ``text_input``
  are required. Streamed ``text_output`` is the text each response adds (the postprocessing model
  decodes each response's new tokens); without ``exclude_input_in_output`` a unary answer starts
  with the prompt (the backend's ``output_ids`` then hold the input; modelled, not re-read).

Both turn a request into one ``GenerateRequest`` for the same orchestrator. An input the engines
cannot honour (a value other than the neutral one) is refused with ``InvalidRequestError`` naming
the input and the feature, never silently ignored.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from trtllm_prfaas.deploy import contract
from trtllm_prfaas.deploy.contract import TensorDecl
from trtllm_prfaas.errors import ConfigError, InvalidRequestError
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator

__all__ = ["ENSEMBLE", "LLMAPI_MAX_TOKENS", "Parsed", "Reply", "ServedModel", "served_models"]

LLMAPI_MAX_TOKENS = 32  # tensorrt_llm SamplingParams.max_tokens default, as llmapi applies it
Tensors = Mapping[str, list[Any]]
OutputValue = tuple[list[int], list[Any]]  # shape, flat values (BYTES: bytes; others: numbers)


@dataclass(frozen=True)
class Reply:
    """What one response answers: the new tokens and text, the text so far, the reason."""

    token_ids: list[int]
    text: str
    text_so_far: str
    finish_reason: str | None
    is_streamed: bool


@dataclass(frozen=True)
class Parsed:
    """A request for the orchestrator, and how its responses are shaped."""

    gen: GenerateRequest
    return_finish_reason: bool = False
    return_stop_reason: bool = False
    prompt_text: str = ""  # prepended to unary text (ensemble without exclude_input_in_output)


@dataclass(frozen=True)
class _Refusal:
    feature: str
    is_neutral: Callable[[list[Any]], bool]  # the values that ask for nothing unsupported


def _equals(value: float) -> Callable[[list[Any]], bool]:
    return lambda values: all(float(v) == value for v in values)


def _in(*allowed: float) -> Callable[[list[Any]], bool]:
    return lambda values: all(float(v) in allowed for v in values)


def _empty(values: list[Any]) -> bool:
    return all(not bytes(v) for v in values)


def _never(values: list[Any]) -> bool:
    return False


def _refuse(tensors: Tensors, refusals: Mapping[str, _Refusal], model: str) -> None:
    for name, refusal in refusals.items():
        if name in tensors and not refusal.is_neutral(tensors[name]):
            raise InvalidRequestError(
                f"input '{name}' asks for {refusal.feature}, which model '{model}' on this "
                "server cannot honour"
            )


def _scalar(tensors: Tensors, name: str, default: Any) -> Any:
    values = tensors.get(name)
    if values is None:
        return default
    if len(values) != 1:
        raise InvalidRequestError(f"input '{name}' must have exactly one element")
    return values[0]


def _prompt(tensors: Tensors, orchestrator: Orchestrator) -> tuple[list[int], str, str]:
    """Token ids, text and the input they came from (``text_input``, or ``input_ids``)."""
    if "input_ids" in tensors:
        if "text_input" in tensors:
            raise InvalidRequestError(
                "exactly one of inputs 'text_input' and 'input_ids' is required; got both"
            )
        ids = [int(t) for t in tensors["input_ids"]]
        if not ids:
            raise InvalidRequestError("input 'input_ids' is empty")
        for position, token in enumerate(ids):
            if not 0 <= token < orchestrator.vocab_size:
                raise InvalidRequestError(
                    f"input 'input_ids': token {token} at position {position} is outside the "
                    f"vocabulary [0, {orchestrator.vocab_size})"
                )
        return ids, "", "input_ids"
    if "text_input" not in tensors:
        raise InvalidRequestError("missing required input 'text_input'")
    values = tensors["text_input"]
    if len(values) != 1:
        raise InvalidRequestError("input 'text_input' must have exactly one element")
    try:
        text = bytes(values[0]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"input 'text_input' is not valid UTF-8: {exc}") from exc
    if not text:
        raise InvalidRequestError("input 'text_input' is empty")
    return orchestrator.encode(text), text, "text_input"


@dataclass(frozen=True)
class _Sampling:
    max_tokens: int
    temperature: float
    seed: int
    streaming: bool


def _generate_request(
    orchestrator: Orchestrator,
    prompt: list[int],
    source: str,
    names: tuple[str, str, str],  # the model's inputs for max_tokens, temperature, seed
    sampling: _Sampling,
    request_id: str,
    deadline_s: float,
) -> GenerateRequest:
    max_name, temp_name, seed_name = names
    if sampling.max_tokens <= 0:
        raise InvalidRequestError(f"input '{max_name}' must be > 0, got {sampling.max_tokens}")
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0.0):
        raise InvalidRequestError(
            f"input '{temp_name}' must be finite and >= 0, got {sampling.temperature}"
        )
    if sampling.seed < 0:
        raise InvalidRequestError(f"input '{seed_name}' must be >= 0, got {sampling.seed}")
    if len(prompt) + sampling.max_tokens > orchestrator.max_seq_len:
        raise InvalidRequestError(
            f"input '{source}' of {len(prompt)} tokens + {max_name} {sampling.max_tokens} "
            f"exceeds the max length {orchestrator.max_seq_len}"
        )
    return GenerateRequest(request_id, prompt, sampling.max_tokens, sampling.temperature,
                           sampling.seed, sampling.streaming, deadline_s)  # fmt: skip


class ServedModel(ABC):
    """One served model: its declared tensors, its request parsing, its response tensors."""

    platform = ""
    backend = ""
    max_batch_size = 0
    cumulative_text = False

    def __init__(self, name: str, inputs: tuple[TensorDecl, ...],
                 outputs: tuple[TensorDecl, ...]) -> None:  # fmt: skip
        self.name, self.inputs, self.outputs = name, inputs, outputs
        self.input_decls = {decl.name: decl for decl in inputs}
        self.output_decls = {decl.name: decl for decl in outputs}

    def check_required(self, tensors: Tensors) -> None:
        """Refuse a request without every required input, worded as Triton's core words it
        (``InferenceRequest::Normalize``; see the llmapi fake's ``triton_core.py``)."""
        required = [decl.name for decl in self.inputs if not decl.optional]
        missing = [
            name for name in required if name not in tensors and not self._stood_in(name, tensors)
        ]
        if missing:
            got = "[" + ",".join(f"'{n}'" for n in tensors) + "]"
            need = "[" + ",".join(f"'{n}'" for n in missing) + "]"
            raise InvalidRequestError(
                f"expected number of inputs between {len(required)} and {len(self.inputs)} but "
                f"got {len(tensors)} inputs for model '{self.name}'. Got input(s) {got}, but "
                f"missing required input(s) {need}. Please provide all required input(s)."
            )

    def _stood_in(self, name: str, tensors: Tensors) -> bool:
        """Whether another input takes the place of required input ``name``."""
        return False

    @abstractmethod
    def parse(
        self, tensors: Tensors, orchestrator: Orchestrator, request_id: str, deadline_s: float
    ) -> Parsed:
        """Validate decoded inputs; InvalidRequestError names the input that is wrong."""

    @abstractmethod
    def answer(self, reply: Reply, parsed: Parsed) -> dict[str, OutputValue]:
        """The output tensors of one response, in declaration order."""


class LlmapiModel(ServedModel):
    """TensorRT-LLM's ``llmapi`` model (see the module docstring)."""

    backend = "python"
    cumulative_text = True
    _REFUSALS: ClassVar[Mapping[str, _Refusal]] = {
        "image_url": _Refusal("a multimodal (image) prompt", _never),
        "sampling_param_best_of": _Refusal("best_of > 1", _equals(1)),
        "sampling_param_top_k": _Refusal("top-k sampling (0: off, 1: greedy)", _in(0, 1)),
        "sampling_param_top_p": _Refusal("top-p sampling (only 1.0: off)", _equals(1.0)),
        "sampling_param_frequency_penalty": _Refusal("a frequency penalty", _equals(0.0)),
        "sampling_param_presence_penalty": _Refusal("a presence penalty", _equals(0.0)),
        "sampling_param_stop": _Refusal("stop strings", _empty),
        "sampling_param_return_perf_metrics": _Refusal("perf metrics outputs", _equals(0)),
        "return_cumulative_logprob": _Refusal("log probabilities", _equals(0)),
        "stop": _Refusal("a stop request (cancel the gRPC call instead)", _equals(0)),
        **{name: _Refusal("LoRA adapters", _never)
           for name in ("lora_id", "lora_name", "lora_path", "lora_ckpt_source")},
    }  # fmt: skip

    def __init__(self, name: str) -> None:
        super().__init__(name, contract.LLMAPI_INPUTS + contract.FRONTDOOR_EXTRA_INPUTS,
                         contract.LLMAPI_OUTPUTS + contract.FRONTDOOR_EXTRA_OUTPUTS)  # fmt: skip

    def _stood_in(self, name: str, tensors: Tensors) -> bool:
        return name == "text_input" and "input_ids" in tensors  # the front door's extension

    def parse(
        self, tensors: Tensors, orchestrator: Orchestrator, request_id: str, deadline_s: float
    ) -> Parsed:
        self.check_required(tensors)
        _refuse(tensors, self._REFUSALS, self.name)
        prompt, _, source = _prompt(tensors, orchestrator)
        temperature = float(_scalar(tensors, "sampling_param_temperature", 0.0))
        if int(_scalar(tensors, "sampling_param_top_k", 0)) == 1:
            temperature = 0.0  # top-k 1 is greedy
        sampling = _Sampling(
            int(_scalar(tensors, "sampling_param_max_tokens", LLMAPI_MAX_TOKENS)),
            temperature,
            int(_scalar(tensors, "sampling_param_seed", 0)),
            bool(_scalar(tensors, "streaming", False)),
        )
        names = ("sampling_param_max_tokens", "sampling_param_temperature", "sampling_param_seed")
        gen = _generate_request(orchestrator, prompt, source, names, sampling, request_id,
                                deadline_s)  # fmt: skip
        return Parsed(
            gen,
            return_finish_reason=bool(_scalar(tensors, "return_finish_reason", False)),
            return_stop_reason=bool(_scalar(tensors, "return_stop_reason", False)),
        )

    def answer(self, reply: Reply, parsed: Parsed) -> dict[str, OutputValue]:
        text = reply.text_so_far if reply.is_streamed else reply.text
        values: dict[str, OutputValue] = {"text_output": ([1], [text.encode("utf-8")])}
        if parsed.return_finish_reason:
            values["finish_reason"] = ([1], [str(reply.finish_reason).encode()])
        if parsed.return_stop_reason:
            values["stop_reason"] = ([1], [b"None"])  # no stop strings: str(None), as upstream
        values["output_ids"] = ([len(reply.token_ids)], list(reply.token_ids))
        return values


class EnsembleModel(ServedModel):
    """The classic ``inflight_batcher_llm`` ensemble (see the module docstring)."""

    platform = "ensemble"
    max_batch_size = 1  # one prompt per request; perf_analyzer sends shapes [1, 1]
    _REFUSALS: ClassVar[Mapping[str, _Refusal]] = {
        "decoder_text_input": _Refusal("an encoder-decoder prompt", _never),
        "num_return_sequences": _Refusal("several sequences", _equals(1)),
        "bad_words": _Refusal("bad words", _empty),
        "stop_words": _Refusal("stop words", _empty),
        "end_id": _Refusal("a custom end id (generation ends at the model's EOS)", _never),
        "top_k": _Refusal("top-k sampling (0: off, 1: greedy)", _in(0, 1)),
        "top_p": _Refusal("top-p sampling (only 1.0: off)", _equals(1.0)),
        "repetition_penalty": _Refusal("a repetition penalty", _equals(1.0)),
        "presence_penalty": _Refusal("a presence penalty", _equals(0.0)),
        "frequency_penalty": _Refusal("a frequency penalty", _equals(0.0)),
        "min_tokens": _Refusal("a minimum output length", _in(0, 1)),
        "min_length": _Refusal("a minimum output length", _in(0, 1)),
        "beam_width": _Refusal("beam search", _equals(1)),
        **{name: _Refusal(f"the '{name.removeprefix('return_')}' output", _equals(0))
           for name in ("return_log_probs", "return_context_logits",
                        "return_generation_logits", "return_perf_metrics",
                        "return_num_input_tokens", "return_num_output_tokens")},
        **{name: _Refusal("prompt tuning", _never)
           for name in ("prompt_embedding_table", "prompt_table_extra_id", "prompt_vocab_size")},
        **{name: _Refusal("an embedding bias", _never)
           for name in ("embedding_bias_words", "embedding_bias_weights")},
        **{name: _Refusal("LoRA adapters", _never)
           for name in ("lora_task_id", "lora_weights", "lora_config")},
        **{name: _Refusal("guided decoding", _never)
           for name in ("guided_decoding_guide_type", "guided_decoding_guide")},
    }  # fmt: skip

    def __init__(self) -> None:
        super().__init__("ensemble", contract.ENSEMBLE_INPUTS, contract.ENSEMBLE_OUTPUTS)

    def parse(
        self, tensors: Tensors, orchestrator: Orchestrator, request_id: str, deadline_s: float
    ) -> Parsed:
        self.check_required(tensors)
        _refuse(tensors, self._REFUSALS, self.name)
        if "seed" in tensors and "random_seed" in tensors:
            raise InvalidRequestError("inputs 'seed' and 'random_seed' are the same; give one")
        prompt, text, source = _prompt(tensors, orchestrator)
        temperature = float(_scalar(tensors, "temperature", 0.0))
        if int(_scalar(tensors, "top_k", 0)) == 1:
            temperature = 0.0
        seed_name = "random_seed" if "random_seed" in tensors else "seed"
        sampling = _Sampling(
            int(_scalar(tensors, "max_tokens", 0)),
            temperature,
            int(_scalar(tensors, seed_name, 0)),
            bool(_scalar(tensors, "stream", False)),
        )
        gen = _generate_request(orchestrator, prompt, source,
                                ("max_tokens", "temperature", seed_name), sampling, request_id,
                                deadline_s)  # fmt: skip
        exclude = bool(_scalar(tensors, "exclude_input_in_output", False))
        return Parsed(gen, prompt_text="" if exclude else text)

    def answer(self, reply: Reply, parsed: Parsed) -> dict[str, OutputValue]:
        text = reply.text if reply.is_streamed else parsed.prompt_text + reply.text
        return {"text_output": ([1], [text.encode("utf-8")])}


ENSEMBLE = "ensemble"


def served_models(llmapi_name: str) -> dict[str, ServedModel]:
    """The models one front door serves: ``llmapi_name`` (the orchestrator's) and ``ensemble``."""
    if llmapi_name == ENSEMBLE:
        raise ConfigError("model name 'ensemble' is taken by the classic ensemble; choose another")
    return {llmapi_name: LlmapiModel(llmapi_name), ENSEMBLE: EnsembleModel()}
