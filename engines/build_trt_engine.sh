#!/usr/bin/env bash
# Build TensorRT engines for users who need the TensorRT backend (not run in CI; needs GPUs).
#
#   engines/build_trt_engine.sh prefill|decode HF_MODEL_DIR OUT_DIR [CONVERT_SCRIPT]
#
# Run inside nvcr.io/nvidia/tritonserver:<tag>-trtllm-python-py3 (or the TensorRT-LLM release
# image) on the target hardware: an engine is specific to the GPU model it was built on (build the
# prefill engine on an H200 node, the decode engine on an H20 node).
#
# READ FIRST: the TensorRT backend has no KV cache connector hook (the connector API is PyTorch-
# backend only), so a TensorRT engine cannot take a PrfaaS prefill or decode role. Use these
# engines for the homogeneous-PD baseline the paper compares against, or for standalone serving
# behind the router's local path; the PrfaaS roles use engines/h200_prefill.yaml and
# engines/h20_decode.yaml with the PyTorch backend, which need no build step. TensorRT-LLM also
# marks this checkpoint-conversion + trtllm-build flow as legacy.
#
# Two steps, as TensorRT-LLM documents them:
#   1. convert_checkpoint.py (per model family, under examples/models/core/<family>/ in the
#      TensorRT-LLM tag of the container): HF weights -> TensorRT-LLM checkpoint, split for TP.
#   2. trtllm-build: checkpoint -> one engine per rank, with the same limits as the YAML configs.
set -euo pipefail

role=${1:?usage: $0 prefill|decode HF_MODEL_DIR OUT_DIR [CONVERT_SCRIPT]}
model_dir=${2:?HF_MODEL_DIR}
out_dir=${3:?OUT_DIR}
convert=${4:-examples/models/core/llama/convert_checkpoint.py}

tp=8                      # one instance = 8 GPUs, as in engines/*.yaml
max_input_len=131072      # the paper's prompt truncation
max_seq_len=132096        # + 1024 output tokens
case "$role" in
  prefill)                # 8x H200: big chunks, few concurrent prompts (see h200_prefill.yaml)
    max_batch_size=8
    max_num_tokens=16384
    ;;
  decode)                 # 8x H20: BS_max 20 for the 40 tok/s SLO (see h20_decode.yaml)
    max_batch_size=20
    max_num_tokens=1024
    ;;
  *)
    echo "role must be prefill or decode, got '$role'" >&2
    exit 2
    ;;
esac

ckpt_dir="$out_dir/checkpoint-tp$tp"
engine_dir="$out_dir/engine-$role-tp$tp"

python3 "$convert" \
  --model_dir "$model_dir" \
  --output_dir "$ckpt_dir" \
  --dtype bfloat16 \
  --tp_size "$tp"

# --use_paged_context_fmha: needed for chunked context and KV block reuse.
# --kv_cache_type paged: block-structured KV, as the PyTorch path uses.
# --multiple_profiles: better kernels across the wide range of token counts per iteration.
trtllm-build \
  --checkpoint_dir "$ckpt_dir" \
  --output_dir "$engine_dir" \
  --gemm_plugin auto \
  --kv_cache_type paged \
  --use_paged_context_fmha enable \
  --multiple_profiles enable \
  --max_batch_size "$max_batch_size" \
  --max_num_tokens "$max_num_tokens" \
  --max_input_len "$max_input_len" \
  --max_seq_len "$max_seq_len" \
  --workers "$tp"

echo "engine written to $engine_dir"
