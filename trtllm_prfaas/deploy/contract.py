"""Contract checks for deployment artifacts, usable from tests and before a rollout.

- ``parse_model_config``: a ``config.pbtxt`` parsed with tritonclient's ``model_config_pb2`` in
  protobuf text format (the parser Triton itself uses); a bad field raises ``ConfigError``.
- ``unknown_llm_api_fields``: the keys of a ``model.yaml`` that are not TensorRT-LLM LLM-API
  fields, given the known field names (TensorRT-LLM's arguments are pydantic models with
  ``extra="forbid"``, so an unknown key fails ``LLM(...)`` at load time on the GPU).
- ``connector_contract_problems``: what the KV cache connector API requires of the arguments.
- ``LLMAPI_*`` / ``ENSEMBLE_*``: the tensors of Triton's ``llmapi`` model and of the classic
  ``inflight_batcher_llm`` ensemble, as upstream declares them (the one source the front door,
  ``prfaas triton-repo`` and the test fakes share); ``add_tensors`` / ``pbtxt_entries`` write them.

Every function returns data (a message, a list of problems) and has no side effects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trtllm_prfaas.errors import ConfigError

__all__ = [
    "ENSEMBLE_INPUTS",
    "ENSEMBLE_OUTPUTS",
    "FRONTDOOR_EXTRA_INPUTS",
    "FRONTDOOR_EXTRA_OUTPUTS",
    "LLMAPI_INPUTS",
    "LLMAPI_OUTPUTS",
    "KnownFields",
    "TensorDecl",
    "add_tensors",
    "connector_contract_problems",
    "parse_model_config",
    "pbtxt_entries",
    "unknown_llm_api_fields",
]

# field name -> None (a leaf, or a section whose keys are not checked) or the section's own
# KnownFields (a nested pydantic model such as kv_cache_config)
KnownFields = Mapping[str, "KnownFields | None"]


def parse_model_config(text: str) -> Any:
    """``text`` parsed as a Triton ``ModelConfig`` message (``model_config_pb2``)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(f"config.pbtxt: {exc}") from exc
    return message


def unknown_llm_api_fields(
    document: Mapping[str, Any], known: KnownFields, prefix: str = ""
) -> list[str]:
    """Dotted paths of the keys in ``document`` absent from ``known``, recursing into sections."""
    problems: list[str] = []
    for key, value in document.items():
        path = f"{prefix}{key}"
        if key not in known:
            problems.append(path)
            continue
        section = known[key]
        if section is not None and isinstance(value, Mapping):
            problems += unknown_llm_api_fields(value, section, prefix=f"{path}.")
    return problems


def connector_contract_problems(document: Mapping[str, Any]) -> list[str]:
    """What breaks the KV cache connector API's requirements in a ``model.yaml`` mapping.

    Checked: PyTorch backend, the three ``kv_connector_config`` names, no pipeline parallelism,
    CUDA graphs off, block reuse on, beam width 1 (when given).
    """
    problems: list[str] = []
    if document.get("backend") != "pytorch":
        problems.append("backend: must be 'pytorch' (the connector API is PyTorch-only)")
    connector = document.get("kv_connector_config") or {}
    for key in ("connector_module", "connector_scheduler_class", "connector_worker_class"):
        if not isinstance(connector.get(key), str) or not connector[key]:
            problems.append(f"kv_connector_config.{key}: missing")
    if document.get("pipeline_parallel_size", 1) != 1:
        problems.append("pipeline_parallel_size: must be 1 (no pipeline parallelism)")
    if document.get("cuda_graph_config", {}) is not None:
        problems.append("cuda_graph_config: must be null (CUDA graphs off)")
    kv_cache = document.get("kv_cache_config") or {}
    if kv_cache.get("enable_block_reuse") is not True:
        problems.append("kv_cache_config.enable_block_reuse: must be true")
    if document.get("max_beam_width", 1) != 1:
        problems.append("max_beam_width: must be 1")
    return problems


# ------------------------------------------------------------------ Triton model contracts
# One source for the tensors of the two models the front door serves and of the config.pbtxt
# that ``prfaas triton-repo`` renders (``triton_repo.py``); the llmapi fake in tests imports them.


@dataclass(frozen=True)
class TensorDecl:
    """One ``input`` or ``output`` entry of a Triton ``config.pbtxt``, as declared upstream."""

    name: str
    data_type: str  # model_config_pb2 DataType name, e.g. "TYPE_STRING"
    dims: tuple[int, ...]  # without the batch dimension (-1: any length)
    optional: bool = False  # inputs only: False means Triton requires the input


def _decls(
    rows: tuple[tuple[str, str, tuple[int, ...], bool], ...],
) -> tuple[TensorDecl, ...]:
    return tuple(TensorDecl(name, f"TYPE_{t}", dims, opt) for name, t, dims, opt in rows)


_S, _B, _I32, _U64, _F32, _I64, _F16 = "STRING", "BOOL", "INT32", "UINT64", "FP32", "INT64", "FP16"
_ONE, _ANY = (1,), (-1,)

# TensorRT-LLM's ``llmapi`` model: NVIDIA/TensorRT-LLM
# ``triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt`` (commit 0a71057, stored copy
# 66255222930), in its order. ``text_input`` is the only required input; there is no
# ``input_ids`` and no ``output_ids`` (the 1.2-era copy is a subset: no image_url, no LoRA).
LLMAPI_INPUTS: tuple[TensorDecl, ...] = _decls((
    ("text_input", _S, _ANY, False), ("image_url", _S, _ANY, True),
    ("streaming", _B, _ONE, True), ("sampling_param_best_of", _I32, _ONE, True),
    ("sampling_param_temperature", _F32, _ONE, True), ("sampling_param_top_k", _I32, _ONE, True),
    ("sampling_param_top_p", _F32, _ONE, True),
    ("sampling_param_frequency_penalty", _F32, _ONE, True),
    ("sampling_param_presence_penalty", _F32, _ONE, True),
    ("sampling_param_max_tokens", _I32, _ONE, True), ("sampling_param_stop", _S, _ANY, True),
    ("sampling_param_seed", _U64, _ONE, True),
    ("sampling_param_exclude_input_from_output", _B, _ONE, True),
    ("sampling_param_return_perf_metrics", _B, _ONE, True),
    ("return_finish_reason", _B, _ONE, True), ("return_stop_reason", _B, _ONE, True),
    ("return_cumulative_logprob", _B, _ONE, True), ("stop", _B, _ONE, True),
    ("lora_id", _U64, _ONE, True), ("lora_name", _S, _ONE, True), ("lora_path", _S, _ONE, True),
    ("lora_ckpt_source", _S, _ONE, True),
))  # fmt: skip
LLMAPI_OUTPUTS: tuple[TensorDecl, ...] = _decls((
    ("text_output", _S, _ANY, False), ("finish_reason", _S, _ANY, False),
    ("stop_reason", _S, _ANY, False), ("cumulative_logprob", _F32, _ANY, False),
    ("kv_cache_reused_block", _I32, _ANY, False), ("kv_cache_missed_block", _I32, _ANY, False),
    ("kv_cache_alloc_new_blocks", _I32, _ANY, False),
    ("kv_cache_alloc_total_blocks", _I32, _ANY, False), ("kv_cache_hit_rate", _F32, _ANY, False),
    ("arrival_time_ns", _I64, _ONE, False), ("first_scheduled_time_ns", _I64, _ONE, False),
    ("first_token_time_ns", _I64, _ONE, False), ("last_token_time_ns", _I64, _ONE, False),
    ("acceptance_rate", _F32, _ONE, False), ("total_accepted_draft_tokens", _I32, _ONE, False),
    ("total_draft_tokens", _I32, _ONE, False),
))  # fmt: skip

# The PrfaaS front door's additions to ``tensorrt_llm`` (not upstream): token ids in, in place of
# ``text_input``, and the token ids of each response out (exact token counts for benchmarks).
FRONTDOOR_EXTRA_INPUTS: tuple[TensorDecl, ...] = _decls((("input_ids", _I32, _ANY, True),))
FRONTDOOR_EXTRA_OUTPUTS: tuple[TensorDecl, ...] = _decls((("output_ids", _I32, _ANY, False),))

# The classic ``inflight_batcher_llm`` ensemble: NVIDIA/TensorRT-LLM
# ``triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt`` (commit 2a9abd9,
# stored copy 634233598), in its order, plus two names of the older releases that genai-perf's
# ``tensorrtllm`` converter still sends or documents: ``min_length`` (sent with deterministic
# output lengths; perf_analyzer 263c5f6 ``tensorrtllm_converter.py``) and ``random_seed``.
# Upstream lists ``kv_cache_alloc_total_blocks`` twice; it is declared once here.
ENSEMBLE_INPUTS: tuple[TensorDecl, ...] = _decls((
    ("text_input", _S, _ONE, False), ("decoder_text_input", _S, _ONE, True),
    ("max_tokens", _I32, _ONE, False), ("num_return_sequences", _I32, _ONE, True),
    ("bad_words", _S, _ANY, True), ("stop_words", _S, _ANY, True),
    ("exclude_input_in_output", _B, _ONE, True), ("end_id", _I32, _ONE, True),
    ("pad_id", _I32, _ONE, True), ("top_k", _I32, _ONE, True), ("top_p", _F32, _ONE, True),
    ("temperature", _F32, _ONE, True), ("length_penalty", _F32, _ONE, True),
    ("repetition_penalty", _F32, _ONE, True), ("min_tokens", _I32, _ONE, True),
    ("presence_penalty", _F32, _ONE, True), ("frequency_penalty", _F32, _ONE, True),
    ("seed", _U64, _ONE, True), ("return_log_probs", _B, _ONE, True),
    ("return_context_logits", _B, _ONE, True), ("return_generation_logits", _B, _ONE, True),
    ("return_perf_metrics", _B, _ONE, True), ("return_num_input_tokens", _B, _ONE, True),
    ("return_num_output_tokens", _B, _ONE, True), ("beam_width", _I32, _ONE, True),
    ("stream", _B, _ONE, True), ("prompt_embedding_table", _F16, (-1, -1), True),
    ("prompt_table_extra_id", _U64, _ONE, True), ("prompt_vocab_size", _I32, _ONE, True),
    ("embedding_bias_words", _S, _ANY, True), ("embedding_bias_weights", _F32, _ANY, True),
    ("lora_task_id", _U64, _ONE, True), ("lora_weights", _F16, (-1, -1), True),
    ("lora_config", _I32, (-1, 3), True), ("guided_decoding_guide_type", _S, _ONE, True),
    ("guided_decoding_guide", _S, _ONE, True),
    ("min_length", _I32, _ONE, True), ("random_seed", _U64, _ONE, True),
))  # fmt: skip
ENSEMBLE_OUTPUTS: tuple[TensorDecl, ...] = _decls((
    ("text_output", _S, _ANY, False), ("cum_log_probs", _F32, _ANY, False),
    ("output_log_probs", _F32, (-1, -1), False), ("context_logits", _F32, (-1, -1), False),
    ("generation_logits", _F32, (-1, -1, -1), False), ("batch_index", _I32, _ONE, False),
    ("sequence_index", _I32, _ONE, False), ("kv_cache_alloc_new_blocks", _I32, _ONE, False),
    ("kv_cache_reused_blocks", _I32, _ONE, False),
    ("kv_cache_alloc_total_blocks", _I32, _ONE, False), ("arrival_time_ns", _I64, _ONE, False),
    ("first_scheduled_time_ns", _I64, _ONE, False), ("first_token_time_ns", _I64, _ONE, False),
    ("last_token_time_ns", _I64, _ONE, False), ("acceptance_rate", _F32, _ONE, False),
    ("total_accepted_draft_tokens", _I32, _ONE, False), ("total_draft_tokens", _I32, _ONE, False),
    ("num_input_tokens", _I32, _ONE, False), ("num_output_tokens", _I32, _ONE, False),
))  # fmt: skip


def add_tensors(
    config: Any, inputs: tuple[TensorDecl, ...], outputs: tuple[TensorDecl, ...]
) -> None:
    """Append ``inputs`` and ``outputs`` to a ``model_config_pb2.ModelConfig`` message."""
    from tritonclient.grpc import model_config_pb2 as mc

    for decl in inputs:
        config.input.add(name=decl.name, data_type=mc.DataType.Value(decl.data_type),
                         dims=list(decl.dims), optional=decl.optional)  # fmt: skip
    for decl in outputs:
        config.output.add(
            name=decl.name, data_type=mc.DataType.Value(decl.data_type), dims=list(decl.dims)
        )


def pbtxt_entries(decls: tuple[TensorDecl, ...]) -> str:
    """``decls`` as the entries of a ``config.pbtxt`` ``input [...]`` or ``output [...]`` list."""

    def entry(decl: TensorDecl) -> str:
        dims = "[ " + ", ".join(str(d) for d in decl.dims) + " ]"
        opt = ", optional: true" if decl.optional else ""
        return f'  {{ name: "{decl.name}", data_type: {decl.data_type}, dims: {dims}{opt} }}'

    return ",\n".join(entry(decl) for decl in decls)
