"""TensorRT-LLM LLM-API field names that deployment files may use.

Source: NVIDIA/TensorRT-LLM ``tensorrt_llm/llmapi/llm_args.py`` (the 1.1/1.2 line): the fields of
``BaseLlmArgs`` and ``TorchLlmArgs``, and of the nested models ``KvCacheConfig``,
``SchedulerConfig``, ``CudaGraphConfig`` and ``KvCacheConnectorConfig``. Every model there is a
pydantic ``StrictBaseModel`` (``extra="forbid"``), so a misspelt key fails ``LLM(...)`` on a GPU;
this list lets CI catch it first. ``triton_config`` is the llmapi model's own section
(``triton_backend/all_models/llmapi/tensorrt_llm/1/model.py`` strips it before ``LLM(...)``;
it reads ``max_batch_size``, ``decoupled`` and ``cancellation_check_period_ms``).
Not exhaustive: only fields this project sets or is likely to set. Add with care, from the source.
"""

from __future__ import annotations

from trtllm_prfaas.deploy.contract import KnownFields

KV_CACHE_CONFIG: KnownFields = dict.fromkeys([
    "enable_block_reuse", "max_tokens", "max_attention_window", "sink_token_length",
    "free_gpu_memory_fraction", "host_cache_size", "onboard_blocks", "cross_kv_cache_fraction",
    "secondary_offload_min_priority", "event_buffer_max_size", "enable_partial_reuse",
    "copy_on_partial_reuse", "use_uvm", "max_gpu_total_bytes", "dtype", "mamba_ssm_cache_dtype",
    "tokens_per_block",
])  # fmt: skip

SCHEDULER_CONFIG: KnownFields = dict.fromkeys([
    "capacity_scheduler_policy", "context_chunking_policy", "dynamic_batch_config",
])  # fmt: skip

CUDA_GRAPH_CONFIG: KnownFields = dict.fromkeys(["batch_sizes", "max_batch_size", "enable_padding"])

KV_CONNECTOR_CONFIG: KnownFields = dict.fromkeys([
    "connector_module", "connector_scheduler_class", "connector_worker_class",
])  # fmt: skip

TRITON_CONFIG: KnownFields = dict.fromkeys([
    "max_batch_size", "decoupled", "cancellation_check_period_ms",
])  # fmt: skip

_LEAVES = [
    # BaseLlmArgs
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
    "tensor_parallel_size", "dtype", "revision", "tokenizer_revision", "pipeline_parallel_size",
    "context_parallel_size", "gpus_per_node", "moe_cluster_parallel_size",
    "moe_tensor_parallel_size", "moe_expert_parallel_size", "enable_attention_dp",
    "load_format", "enable_lora", "lora_config", "enable_chunked_prefill",
    "guided_decoding_backend", "iter_stats_max_iterations", "request_stats_max_iterations",
    "peft_cache_config", "cache_transceiver_config", "speculative_config", "max_batch_size",
    "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens",
    "gather_generation_logits", "num_postprocess_workers", "postprocess_tokenizer_dir",
    "reasoning_parser", "backend", "return_perf_metrics",
    # TorchLlmArgs
    "garbage_collection_gen0_threshold", "attention_dp_config", "disable_overlap_scheduler",
    "moe_config", "attn_backend", "sampler_type", "enable_iter_perf_stats",
    "enable_iter_req_stats", "print_iter_log", "batch_wait_timeout_ms", "torch_compile_config",
    "enable_autotuner", "enable_layerwise_nvtx_marker", "enable_min_latency", "stream_interval",
    "allreduce_strategy", "checkpoint_format",
]  # fmt: skip

LLM_API_FIELDS: KnownFields = {
    **dict.fromkeys(_LEAVES),
    "kv_cache_config": KV_CACHE_CONFIG,
    "scheduler_config": SCHEDULER_CONFIG,
    "cuda_graph_config": CUDA_GRAPH_CONFIG,
    "kv_connector_config": KV_CONNECTOR_CONFIG,
}

MODEL_YAML_FIELDS: KnownFields = {**LLM_API_FIELDS, "triton_config": TRITON_CONFIG}
