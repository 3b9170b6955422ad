"""Contract checks for deployment artifacts, usable from tests and before a rollout.

- ``parse_model_config``: a ``config.pbtxt`` parsed with tritonclient's ``model_config_pb2`` in
  protobuf text format (the parser Triton itself uses); a bad field raises ``ConfigError``.
- ``unknown_llm_api_fields``: the keys of a ``model.yaml`` that are not TensorRT-LLM LLM-API
  fields, given the known field names (TensorRT-LLM's arguments are pydantic models with
  ``extra="forbid"``, so an unknown key fails ``LLM(...)`` at load time on the GPU).
- ``connector_contract_problems``: what the KV cache connector API requires of the arguments.

Every function returns data (a message, a list of problems) and has no side effects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trtllm_prfaas.errors import ConfigError

__all__ = [
    "KnownFields",
    "connector_contract_problems",
    "parse_model_config",
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
