#!/usr/bin/env bash
# The full GPU check of the TensorRT-LLM path (trtllm_prfaas/deploy/gpu_check.py): one line per
# check, PASS|FAIL|SKIP name: detail, under ten minutes. Run it inside the project's Triton image
# (Triton 26.07 + TensorRT-LLM v1.2.1 by default, docker/triton.Dockerfile) with this checkout
# mounted and a small dense Hugging Face checkpoint (e.g. Qwen/Qwen2.5-0.5B-Instruct):
#
#   docker build -f docker/triton.Dockerfile -t prfaas-triton .
#   docker run --rm --gpus all --ipc host --shm-size 8g -v "$PWD":/src -w /src \
#       -v /data/qwen2.5-0.5b-instruct:/models/small:ro prfaas-triton \
#       scripts/gpu_check.sh --model /models/small
#
# --dry-run renders the repositories and prints the plan without starting anything (works on
# any machine with the project installed). Exit status: 0 pass, 1 a check failed, 2 no GPU or
# no TensorRT-LLM (nothing on the GPU path was checked).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
PYTHON="${PYTHON:-python3}"
# The check's own deadline is 570 s; this hard bound (SIGTERM, then SIGKILL 20 s later) is the
# backstop. On SIGTERM the check stops every server it started before it exits.
exec timeout --signal=TERM --kill-after=20 600 \
    "${PYTHON}" -m trtllm_prfaas.deploy.gpu_check --repo-root "${ROOT}" "$@"
